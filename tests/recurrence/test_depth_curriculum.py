"""A depth curriculum (mean_loops_schedule, loop_depth.py): the sampler's mean ramps over training
as McLeish et al. 2025 ramp theirs, and the draws stay a function of (seed, iteration[, g])."""

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from megatron_mesh.recurrence.loop_depth import LoopDepth, LoopDraw


def ramp(schedule, sampler="poisson", mean=5.0, start=1.0, ramp_iters=100, **kwargs):
    return LoopDepth(sampler, mean, trained=2, schedule=schedule, start=start,
                     ramp_iters=ramp_iters, **kwargs)


@pytest.mark.parametrize("iteration, linear, one_minus_sqrt", [
    (0, 1.0, 1.0),
    (25, 1 + 4 * 0.25, 1 + 4 * (1 - math.sqrt(0.75))),
    (50, 1 + 4 * 0.5, 1 + 4 * (1 - math.sqrt(0.5))),
    (75, 1 + 4 * 0.75, 1 + 4 * 0.5),  # 1 - sqrt(1 - 3/4) = 1/2
    (100, 5.0, 5.0),
    (10_000, 5.0, 5.0),  # after the ramp: mean_loops
])
def test_the_schedules_mean_is_the_formula(iteration, linear, one_minus_sqrt):
    """m(i) = s + (M - s) f(min(i / R, 1)), s = 1, M = 5, R = 100: f(p) = p and 1 - sqrt(1 - p)."""
    assert ramp("linear").mean_at(iteration) == pytest.approx(linear, rel=1e-12)
    assert ramp("one_minus_sqrt").mean_at(iteration) == pytest.approx(one_minus_sqrt, rel=1e-12)
    assert ramp("constant", ramp_iters=None).mean_at(iteration) == 5.0


@pytest.mark.parametrize("schedule, warmup_type", [("linear", "linear"), ("one_minus_sqrt", "1-sqrt")])
def test_the_schedule_is_mcleishs_warmup(schedule, warmup_type):
    """Their mean recurrence is transformers' warmup_stable_decay learning rate with lr = M; its
    warmup factor f * (1 - r) + r with r = s / M (their min_lr_ratio) is s + (M - s) f over M."""
    from transformers.optimization import get_wsd_schedule

    mean, start, ramp_iters = 6.0, 2.0, 40
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=mean)
    scheduler = get_wsd_schedule(optimizer, ramp_iters, 0, num_training_steps=100,
                                 warmup_type=warmup_type, min_lr_ratio=start / mean)
    theirs = []
    for _ in range(100):
        theirs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    ours = [ramp(schedule, mean=mean, start=start, ramp_iters=ramp_iters).mean_at(i) for i in range(100)]
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_a_draw_is_made_around_the_scheduled_mean_of_its_iteration():
    """Iteration i of a ramp draws what a constant sampler at mean m(i) draws (same seed, same
    iteration), per batch and per token; from the ramp's end the constant mean_loops' draws."""
    for schedule in ("linear", "one_minus_sqrt"):
        depth = ramp(schedule, max=9, per="token")
        for i in (0, 13, 50, 99, 100, 250):
            at_mean = replace(depth, schedule="constant", mean=depth.mean_at(i))
            np.testing.assert_array_equal(depth.draw(7, i, range(3), 8).active,
                                          at_mean.draw(7, i, range(3), 8).active)
            batch = replace(depth, per="batch")
            assert batch.draw(7, i) == replace(at_mean, per="batch").draw(7, i)
        after = [depth.draw(7, i, range(3), 8).active for i in range(100, 120)]
        constant = replace(depth, schedule="constant")
        for i, got in zip(range(100, 120), after):
            np.testing.assert_array_equal(got, constant.draw(7, i, range(3), 8).active)


@pytest.mark.parametrize("sampler, expected_steps", [
    ("poisson", lambda m: m + math.exp(-m)),  # max(Poisson(m), 1): P(0) = e^-m moves to 1
    ("poisson_lognormal", lambda m: m + 1),  # Poisson(tau) + 1, E[tau] = m
])
def test_the_draws_mean_follows_the_schedule(sampler, expected_steps):
    """Per-batch draws over 4 windows of 5000 iterations of a 20000-iteration ramp from 1 to 5:
    each window's mean depth is the mean of E[steps | m(i)] over it. The standard error of a
    window's mean is at most sqrt(Var / 5000) ~ 0.05 (poisson_lognormal at m = 5: Var = m +
    m^2 (e^0.25 - 1) = 12.1), about 1% of its value; 3% is over 3 standard errors."""
    for schedule in ("linear", "one_minus_sqrt"):
        depth = ramp(schedule, sampler, ramp_iters=20000)
        for window in range(4):
            iterations = range(5000 * window, 5000 * (window + 1))
            got = np.mean([depth.draw(1234, i).num_loops for i in iterations])
            want = np.mean([expected_steps(depth.mean_at(i)) for i in iterations])
            assert got == pytest.approx(want, rel=0.03), (schedule, window)
    # and the ramp is there to see: the first window is shallower than the last
    first = np.mean([depth.draw(1234, i).num_loops for i in range(5000)])
    assert first < np.mean([depth.draw(1234, i).num_loops for i in range(15000, 20000)]) - 1


def test_a_constant_mean_draws_what_it_drew_before_the_curriculum():
    """Regression: the draws recorded before mean_loops_schedule existed, bit for bit."""
    batch = LoopDepth("poisson_lognormal", 3.0, trained=2, max=6, backprop=2)
    assert [(d.num_loops, d.backprop_loops) for d in (batch.draw(1234, i) for i in range(12))] == [
        (3, 2), (2, 2), (4, 2), (3, 2), (1, 1), (1, 1), (3, 2), (6, 2), (4, 2), (6, 2), (3, 2), (3, 2)]
    token = LoopDepth("poisson", 3.0, trained=2, max=6, backprop=2, per="token")
    assert token.draw(7, 5, range(2), 6).active.sum(0).tolist() == [[1, 4, 3, 6, 2, 5], [4, 3, 3, 4, 1, 4]]
    assert LoopDepth("fixed", 3.0, trained=2).draw(0, 4) == LoopDraw(3, 3)


def test_a_resumed_run_draws_what_the_uninterrupted_one_did():
    """A resume rebuilds the sampler from the checkpoint's saved model section and starts at
    iteration k: its draws of k..n are those the uninterrupted run made (the schedule is a
    function of the iteration, not a state that steps); the global RNGs play no part."""
    from megatron_mesh.config.model import MeshConfig

    config = tiny_config("1+2R4+1", "linear_injection", loop_depth="poisson", mean_loops=4.0,
                         max_loops=6, backprop_loops=2, loop_depth_per="sequence",
                         mean_loops_schedule="one_minus_sqrt", mean_loops_start=1.5,
                         mean_loops_ramp_iters=30)
    uninterrupted = LoopDepth.of(config)
    whole = [uninterrupted.draw(11, i, range(8)) for i in range(40)]
    resumed = LoopDepth.of(MeshConfig.from_json(config.to_json()))
    assert resumed == uninterrupted and resumed.ramps
    torch.manual_seed(5)
    np.random.seed(5)
    for k in (0, 17, 30):
        again = [resumed.draw(11, i, range(8)) for i in range(k, 40)]
        for before, after in zip(whole[k:], again):
            assert before == after
            np.testing.assert_array_equal(before.active, after.active)
    assert np.mean([d.mean_loops for d in whole[:10]]) < np.mean([d.mean_loops for d in whole[30:]])


def test_a_fixed_depth_follows_the_rounded_schedule():
    """'fixed' runs round(m(i)) steps: a curriculum of whole steps, even at the layout's K."""
    config = tiny_config("1+2R4+1", "linear_injection", mean_loops_schedule="linear",
                         mean_loops_ramp_iters=6)
    depth = LoopDepth.of(config)
    assert config.mean_loops == 4.0 and config.mean_loops_start == 1.0 and depth.varies
    assert [depth.draw(0, i).num_loops for i in range(8)] == [round(1 + 3 * i / 6) for i in range(6)] + [4, 4]
    assert depth.grad_steps_vary and not replace(depth, backprop=1).grad_steps_vary


@pytest.mark.parametrize("overrides, message", [
    (dict(mean_loops_schedule="linear"),
     "mean_loops_schedule='linear' ramps the mean loop steps from mean_loops_start to mean_loops "
     "over mean_loops_ramp_iters iterations: expected mean_loops_ramp_iters an integer >= 1, got None"),
    (dict(mean_loops_schedule="one_minus_sqrt", mean_loops_ramp_iters=0),
     "expected mean_loops_ramp_iters an integer >= 1, got 0"),
    (dict(mean_loops_ramp_iters=100),
     "mean_loops_ramp_iters=100 is only used by a ramping mean_loops_schedule ('linear' or "
     "'one_minus_sqrt'), not 'constant': remove it, or set mean_loops_schedule"),
    (dict(mean_loops_start=2.0), "mean_loops_start=2.0 is only used by a ramping mean_loops_schedule"),
    (dict(mean_loops_schedule="cosine", mean_loops_ramp_iters=10),
     "mean_loops_schedule='cosine': expected one of ['constant', 'linear', 'one_minus_sqrt']"),
    (dict(mean_loops_schedule="linear", mean_loops_ramp_iters=10, mean_loops_start=0.5),
     "mean_loops_start=0.5: expected a value >= 1"),
    (dict(mean_loops_schedule="linear", mean_loops_ramp_iters=10, mean_loops_start=5.0),
     "mean_loops=4.0 ('linear' from 5.0 over 10 iterations), backprop_loops=None: mean_loops_start"
     "=5.0 > mean_loops=4.0: a mean_loops_schedule ramps the mean up to mean_loops, expected "
     "mean_loops_start <= mean_loops"),
    (dict(scheme="mesh", mean_loops_schedule="linear", mean_loops_ramp_iters=10),
     "state_scheme='mesh' has parameters per loop step"),
    # under pipeline parallelism the schedule's largest mean (mean_loops) must fit the K-step graph
    (dict(mean_loops=5.0, mean_loops_schedule="linear", mean_loops_ramp_iters=10,
          pipeline_model_parallel_size=2, pipeline_dtype=torch.float32),
     "set max_loops <= 4"),
    (dict(loop_depth="poisson", mean_loops_schedule="linear", mean_loops_ramp_iters=10,
          pipeline_model_parallel_size=2, pipeline_dtype=torch.float32),
     "set max_loops <= 4 (got None)"),
])
def test_refused_curricula_name_the_key_and_what_is_expected(overrides, message):
    scheme = overrides.pop("scheme", "linear_injection")
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config("1+2R4+1", scheme, **{"mean_loops": 4.0, **overrides})


def test_a_curriculum_within_the_pipelines_graph_is_accepted():
    """A fixed ramp up to K (or a sampled one capped at K) fits the pipeline's K-step graph."""
    pipelined = dict(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                     mean_loops_schedule="linear", mean_loops_ramp_iters=10)
    assert tiny_config("1+2R4+1", "linear_injection", **pipelined).deepest_draw() == 4
    tiny_config("1+2R4+1", "linear_injection", loop_depth="poisson", max_loops=4, **pipelined)


def test_the_model_section_keeps_the_curriculum_and_refills_the_start():
    config = tiny_config("1+2R2+1", "linear_injection", loop_depth="poisson", mean_loops=3.0,
                         mean_loops_schedule="linear", mean_loops_ramp_iters=10)
    section = config.model_section()
    assert (section["mean_loops_schedule"], section["mean_loops_ramp_iters"]) == ("linear", 10)
    assert "mean_loops_start" not in section and config.mean_loops_start == 1.0
