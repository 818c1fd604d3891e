"""Input injection under the parallel layouts, against one process (real torchrun processes,
fp32, gloo; tolerances: test_parity.py's module docstring).

A sampled loop depth with truncated backprop trains the same under TP=2 + SP and under DP=2
with the distributed optimizer and overlapped gradient reduction: every rank draws the same
depth (a rank drawing another runs another graph: the collectives stop matching and the run
fails), and megatron-core's DDP copes with a depth that changes every step (without recompute
each parameter's gradient hook fires once per backward whatever the depth; with full recompute
it would not, and the trainer refuses that: training/arguments.py). At a fixed depth the
injection state crosses pipeline boundaries like MeSH's buffer: PP=2 x VP=2 with the core split.
"""

import re

import pytest

from batch import tiny_section
from test_parity import DISTOPT, DISTOPT_PP, PP2_VP2, SP, assert_same_run, run

pytestmark = pytest.mark.slow

DEPTH = {"model.loop_depth": "poisson_lognormal", "model.mean_loops": 3, "model.max_loops": 6,
         "model.backprop_loops": 2}


@pytest.fixture(scope="module")
def start(tmp_path_factory, megatron_world):
    """A release checkpoint of a tiny linear-injection (Huginn-style) model."""
    from megatron_mesh.hf.importer import build_model, checkpoint_args, save_release_checkpoint

    section = tiny_section("linear_injection")
    out = tmp_path_factory.mktemp("start-linear") / "ckpt"
    save_release_checkpoint(build_model(section, {}, ("",), seed=5), checkpoint_args(section, None), out)
    return "linear_injection", out


@pytest.fixture(scope="module")
def single(start, tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), start, "single", **DEPTH)


@pytest.mark.parametrize("name, nproc, settings", [("tp2-sp", 2, SP), ("dp2-distopt-overlap", 2, DISTOPT)])
def test_sampled_depth_parallel_run_matches_single_process(start, single, tmp_path, name, nproc, settings):
    assert_same_run(run(tmp_path, start, name, nproc, **DEPTH, **settings), single)


def test_the_log_reports_the_depth_each_step_ran(single):
    from megatron_mesh.loop_depth import LoopDepth

    seed = int(re.search(r"seed \.+ (\d+)", single["log"]).group(1))
    depth = LoopDepth("poisson_lognormal", 3.0, trained=2, max=6, backprop=2)
    logged = [float(x) for x in re.findall(r"loop depth: ([0-9.]+)", single["log"])]
    # the line at iteration i covers the step run at curr_iteration i - 1
    assert logged == [depth.draw(seed, i).num_loops for i in range(1, len(logged) + 1)]
    assert len(logged) == 2


def test_fixed_depth_injection_under_virtual_pipelining_matches_single_process(start, tmp_path):
    """e (the prelude output every step re-injects) rides in the carry across 3 boundaries."""
    fixed = run(tmp_path, start, "fixed")
    assert_same_run(run(tmp_path, start, "pp2-vp2", 2, **PP2_VP2, **DISTOPT_PP), fixed)
