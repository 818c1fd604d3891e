"""Input injection under the parallel layouts, against one process (real torchrun processes,
fp32, gloo; tolerances: test_parity.py's module docstring).

A sampled loop depth with truncated backprop trains the same under TP=2 + SP and under DP=2
with the distributed optimizer and overlapped gradient reduction: every rank draws the same
depth (a rank drawing another runs another graph: the collectives stop matching and the run
fails); a depth per token too (each TP rank masks its own sequence chunk, here with full
recompute per loop step; each DP rank draws
its sequences by their place in the global batch, as the single process does), under a depth
curriculum (the mean ramping linearly, mean_loops_schedule), and a run resumed from its step-2
checkpoint logs the uninterrupted step 3 bit for bit; and
megatron-core's DDP copes with a depth that changes every step (without recompute each
parameter's gradient hook fires once per backward whatever the depth; with full recompute it
would not, and the trainer refuses that: training/arguments.py). At a fixed depth the
injection state crosses pipeline boundaries like MeSH's buffer: PP=2 x VP=2 with the core split.
"""

import re
import shutil

import pytest

from batch import release_checkpoint, tiny_section
from test_parity import DISTOPT, DISTOPT_PP, PP2_VP2, SP, assert_same_run, run

pytestmark = pytest.mark.slow

DEPTH = {"model.loop_depth": "poisson_lognormal", "model.mean_loops": 3, "model.max_loops": 6,
         "model.backprop_loops": 2}
# per token, under a depth curriculum: the mean ramps linearly from 1 to 3 over 4 iterations,
# so every step of these 3-step runs (and the resumed step 3) draws around another mean
RAMP = {"model.mean_loops_schedule": "linear", "model.mean_loops_ramp_iters": 4}
PER_TOKEN = {**DEPTH, "model.loop_depth": "poisson", "model.loop_depth_per": "token", **RAMP}


@pytest.fixture(scope="module")
def start(tmp_path_factory, megatron_world):
    """A release checkpoint of a tiny linear-injection (Huginn-style) model."""
    return "linear_injection", release_checkpoint(tmp_path_factory, "start-linear",
                                                  tiny_section("linear_injection"))


@pytest.fixture(scope="module")
def single(start, tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), start, "single", **DEPTH)


@pytest.mark.parametrize("name, nproc, settings", [("tp2-sp", 2, SP), ("dp2-distopt-overlap", 2, DISTOPT)])
def test_sampled_depth_parallel_run_matches_single_process(start, single, tmp_path, name, nproc, settings):
    assert_same_run(run(tmp_path, start, name, nproc, **DEPTH, **settings), single)


def test_the_log_reports_the_depth_each_step_ran(single):
    from megatron_mesh.recurrence.loop_depth import LoopDepth

    seed = int(re.search(r"seed \.+ (\d+)", single["full_log"]).group(1))
    depth = LoopDepth("poisson_lognormal", 3.0, trained=2, max=6, backprop=2)
    logged = logged_depths(single["log"])
    # the line at iteration i covers the step run at curr_iteration i - 1
    assert logged == [depth.draw(seed, i).num_loops for i in range(1, len(logged) + 1)]
    assert len(logged) == 2


def test_fixed_depth_injection_under_virtual_pipelining_matches_single_process(start, tmp_path):
    """e (the prelude output every step re-injects) rides in the carry across 3 boundaries."""
    fixed = run(tmp_path, start, "fixed")
    assert_same_run(run(tmp_path, start, "pp2-vp2", 2, **PP2_VP2, **DISTOPT_PP), fixed)


@pytest.fixture(scope="module")
def single_per_token(start, tmp_path_factory):
    """A depth per token (Parcae's 'per-token') around a ramping mean, saving after every step."""
    tmp = tmp_path_factory.mktemp("single-per-token")
    return {**run(tmp, start, "single", save="single", **PER_TOKEN, **{"checkpointing.interval": 1}),
            "dir": tmp / "single"}


# full recompute per loop step (uniform, 2 = the core's layers): recomputing changes nothing
RECOMPUTE = {"parallelism.recompute_granularity": "full", "parallelism.recompute_method": "uniform",
             "parallelism.recompute_num_layers": 2}


@pytest.mark.parametrize("name, nproc, settings", [("tp2-sp-recompute", 2, {**SP, **RECOMPUTE}),
                                                   ("dp2-distopt-overlap", 2, DISTOPT)])
def test_per_token_depth_parallel_run_matches_single_process(start, single_per_token, tmp_path,
                                                             name, nproc, settings):
    got = run(tmp_path, start, name, nproc, **PER_TOKEN, **settings)
    assert_same_run(got, single_per_token)
    # the logged depth: each rank's draws, averaged over the data-parallel ranks
    assert logged_depths(got["log"]) == logged_depths(single_per_token["log"])
    if "recompute" in name:
        assert re.search(r"recompute_granularity \.+ full", got["full_log"])


def test_the_log_reports_the_mean_depth_of_the_global_batchs_tokens(single_per_token):
    from megatron_mesh.recurrence.loop_depth import LoopDepth

    seed = int(re.search(r"seed \.+ (\d+)", single_per_token["full_log"]).group(1))
    depth = LoopDepth("poisson", 3.0, trained=2, max=6, backprop=2, per="token",
                      schedule="linear", start=1.0, ramp_iters=4)
    logged = logged_depths(single_per_token["log"])
    # 8 sequences of 64 tokens per step; the line at iteration i covers curr_iteration i - 1
    want = [depth.draw(seed, i, range(8), 64).mean_loops for i in range(1, len(logged) + 1)]
    assert logged == pytest.approx(want, abs=0.005) and len(logged) == 2
    assert len({round(v, 2) for v in logged}) == 2 and all(v != round(v) for v in logged)


def test_the_log_reports_the_scheduled_mean_beside_the_depth(single_per_token):
    """Under a depth curriculum each line also logs the mean its steps drew around: 1 + 2 i / 4
    at curr_iteration i (mean_loops_start 1, mean_loops 3, mean_loops_ramp_iters 4)."""
    means = [float(x) for x in re.findall(r"loop depth: [0-9.]+ \| mean loops: ([0-9.]+) \|",
                                          single_per_token["log"])]
    assert means == [1.5, 2.0]


def test_a_sampled_depth_run_resumes_exactly(start, single_per_token, tmp_path):
    """Resumed from its step-2 checkpoint, the run draws step 3's depths again (a function of
    the seed, the iteration and the sequence's place; the curriculum's mean, 2 there, of the
    iteration too) and logs the uninterrupted step 3."""
    saved = tmp_path / "resumed"
    shutil.copytree(single_per_token["dir"] / "iter_0000002", saved / "iter_0000002")
    (saved / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = run(tmp_path, start, "resumed", save="resumed", **PER_TOKEN)
    for tag in ("lm loss", "grad-norm"):
        assert resumed[tag] == {3: single_per_token[tag][3]}, tag


def logged_depths(log):
    return [float(x) for x in re.findall(r"loop depth: ([0-9.]+)", log)]


# Under pipeline parallelism the stages hold the layout's graph of K = 4 steps (2 without
# gradients, 2 with) and every draw is masked into it; stage boundaries between loop steps:
# [prelude, step 0], [step 1], [step 2], [step 3, coda], two per rank (interleaved).
PIPELINED_DEPTH = {"model.layout": "1+2R4+1", "model.loop_depth": "poisson",
                   "model.loop_depth_per": "token", "model.mean_loops": 2, "model.max_loops": 4,
                   "model.backprop_loops": 2}
PP2_VP2_STEPS = {"parallelism.pipeline": 2, "parallelism.virtual_pipeline": 2,
                 "parallelism.pipeline_stage_layers": "[3,2,2,3]"}


@pytest.fixture(scope="module")
def start_k4(megatron_world, tmp_path_factory):
    """The linear-injection model of ``start`` with a 4-step loop."""
    return "linear_injection", release_checkpoint(
        tmp_path_factory, "start-linear-k4", dict(tiny_section("linear_injection"), layout="1+2R4+1"))


def test_a_sampled_depth_under_virtual_pipelining_matches_single_process(start_k4, tmp_path):
    """Every stage draws the micro-batch's per-token depths (counting micro-batches per model
    chunk) and masks them into its slice of the fixed graph; the single process runs each
    draw's own depth, without padding steps."""
    single = run(tmp_path, start_k4, "single", **PIPELINED_DEPTH)
    pipelined = run(tmp_path, start_k4, "pp2-vp2", 2, **PIPELINED_DEPTH, **PP2_VP2_STEPS, **DISTOPT_PP)
    assert_same_run(pipelined, single)
    assert logged_depths(pipelined["log"]) == logged_depths(single["log"])
