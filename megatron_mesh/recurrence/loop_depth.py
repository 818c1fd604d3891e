"""Loop depth as a training dimension: how many loop steps a training step runs, and through
how many of the last ones the gradient flows (truncated backprop).

Samplers (``MeshConfig.loop_depth``):
- ``fixed``: round(mean) steps, every step;
- ``poisson_lognormal`` (Huginn, recpre/model_dynamic.py 'poisson-lognormal-filling'):
  tau ~ LogNormal(log(mean) - sigma^2 / 2, sigma), so E[tau] = mean; steps = Poisson(tau) + 1;
- ``poisson`` (Parcae, models/parcae/parcae.py ``_sample_batch_depths``):
  steps = max(Poisson(mean), 1).
``max`` caps the draw (neither source has one; a cap bounds activation memory). The gradient
flows through the last min(backprop, steps) steps; the others run without an autograd graph.

What one draw covers (``MeshConfig.loop_depth_per``, Parcae's ``recurrent_iteration_method``):
- ``batch``: one depth for the whole global batch of a training step, from (seed, iteration);
- ``sequence`` / ``token``: one depth per sequence / per token, from (seed, iteration, g) with
  g the sequence's place in the global batch. A micro-batch runs as many steps as its deepest
  element needs, frozen phase first and then the steps with gradients (Parcae's order); step t
  updates only the elements still running in that phase (``LoopDraw.active``), the others keep
  their state. Under per-token depth the tokens that stopped are still attended to.

A depth curriculum (``MeshConfig.mean_loops_schedule``, McLeish et al. 2025, "Teaching
Pretrained Language Models to Think Deeper with Retrofitted Recurrence") ramps the sampler's mean
over training: at iteration i the draws are made around m(i) (``LoopDepth.mean_at``),

    m(i) = start + (mean - start) * f(min(i / ramp_iters, 1)),
    f(p) = p ('linear') or 1 - sqrt(1 - p) ('one_minus_sqrt', their '1-sqrt'),

m(i) = mean from iteration ramp_iters on. Their code (train.py, a warmup_stable_decay scheduler of
transformers whose warmup factor is this f) ramps from 0, clamped to 1, and rounds m(i) up to an
integer; here m(i) stays a real number (the samplers take any mean >= 1; 'fixed' rounds it per
step) and starts at ``start`` (default 1, what their first step runs around).

Every draw is a function of (seed, iteration[, g]) only (m(i) too), so every rank of a step (TP,
DP, and a resumed run) draws the same depth for the same data without communicating, and a
sequence gets the same depth whichever data-parallel rank and micro-batch it lands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import numpy as np

DEPTH_SAMPLERS = ("fixed", "poisson_lognormal", "poisson")

MEAN_SCHEDULES = ("constant", "linear", "one_minus_sqrt")
"""How the sampler's mean moves over training (module docstring)."""

RAMPS = {"linear": lambda p: p, "one_minus_sqrt": lambda p: 1.0 - math.sqrt(1.0 - p)}
"""f(p) of each ramping schedule: the fraction of the way from start to mean at progress p."""

DEPTH_UNITS = ("batch", "sequence", "token")
"""What one depth draw covers (module docstring)."""

EXPECTED_DRAWS = 20000
"""Draws ``LoopDepth.expected`` averages (the expected cost ``model_stats`` reports)."""

HUGINN_SIGMA = 0.5
"""The log-normal's sigma in Huginn's sampler (hard-coded there)."""


def mean_schedule_problem(schedule: str, start: Optional[float],
                          ramp_iters: Optional[int]) -> Optional[str]:
    """Why MeshConfig's mean_loops_schedule, mean_loops_start and mean_loops_ramp_iters do not go
    together, or None (the schedule's choices are checked with every field's)."""
    ramping = " or ".join(repr(name) for name in RAMPS)
    if schedule == "constant":
        for name, value in (("mean_loops_start", start), ("mean_loops_ramp_iters", ramp_iters)):
            if value is not None:
                return (f"{name}={value} is only used by a ramping mean_loops_schedule ({ramping}), "
                        f"not 'constant': remove it, or set mean_loops_schedule")
        return None
    if ramp_iters is None or ramp_iters < 1:
        return (f"mean_loops_schedule={schedule!r} ramps the mean loop steps from mean_loops_start "
                f"to mean_loops over mean_loops_ramp_iters iterations: expected "
                f"mean_loops_ramp_iters an integer >= 1, got {ramp_iters!r}")
    return None


@dataclass(frozen=True)
class LoopDraw:
    """One training step's (or micro-batch's) depth."""

    num_loops: int
    """Loop steps run."""
    backprop_loops: int
    """The last ``backprop_loops`` of them carry gradients."""
    active: Optional[np.ndarray] = field(default=None, compare=False)
    """Per-sequence or per-token depth: bool [num_loops, b] or [num_loops, b, s], whether loop
    step t updates each sequence or token. None: every step updates every element."""

    @classmethod
    def of_elements(cls, steps: np.ndarray, grad: np.ndarray,
                    graph_steps: Optional[Tuple[int, int]] = None) -> "LoopDraw":
        """The draw that runs element i ``steps[i]`` steps, the last ``grad[i]`` with gradients:
        max(frozen) steps without gradients, then max(grad) with (or the ``graph_steps`` = (frozen,
        with gradients) of a fixed graph), each element active for the first of its own in each
        phase."""
        frozen = steps - grad
        counts = graph_steps or (int(frozen.max()), int(grad.max()))
        if frozen.max() > counts[0] or grad.max() > counts[1]:
            raise ValueError(f"a draw of {int(frozen.max())} steps without and {int(grad.max())} "
                             f"with gradients does not fit the graph's {counts}")
        active = np.stack([t < own for own, count in zip((frozen, grad), counts)
                           for t in range(count)])
        return cls(len(active), counts[1], active)

    @property
    def mean_loops(self) -> float:
        """Loop steps per element (the useful work: FLOPs and the logged depth count these)."""
        return self.num_loops if self.active is None else float(self.active.sum(0).mean())

    @property
    def mean_backprop_loops(self) -> float:
        if self.active is None:
            return self.backprop_loops
        return float(self.active[self.num_loops - self.backprop_loops:].sum(0).mean())


@dataclass(frozen=True)
class LoopDepth:
    """A depth sampler (module docstring) for a layout that trains with ``trained`` steps."""

    sampler: str
    mean: float
    trained: int
    """The layout's K."""
    max: Optional[int] = None
    backprop: Optional[int] = None
    sigma: float = HUGINN_SIGMA
    per: str = "batch"
    """What one draw covers: DEPTH_UNITS."""
    schedule: str = "constant"
    """How the mean moves over training: MEAN_SCHEDULES; 'constant' draws around ``mean``."""
    start: float = 1.0
    """A ramping schedule's mean at iteration 0."""
    ramp_iters: Optional[int] = None
    """Iterations a ramping schedule takes from ``start`` to ``mean``."""

    def __post_init__(self):
        if self.schedule != "constant" and (self.schedule not in RAMPS or not self.ramp_iters):
            raise ValueError(f"schedule={self.schedule!r}, ramp_iters={self.ramp_iters}: expected "
                             f"one of {list(RAMPS)} and ramp_iters >= 1, or 'constant'")

    @classmethod
    def of(cls, config) -> "LoopDepth":
        """From a MeshConfig (its loop_depth, mean_loops, max_loops, backprop_loops,
        loop_depth_per and mean_loops_schedule, _start, _ramp_iters)."""
        return cls(config.loop_depth, config.mean_loops, config.num_loops, config.max_loops,
                   config.backprop_loops, per=config.loop_depth_per,
                   schedule=config.mean_loops_schedule, start=config.mean_loops_start,
                   ramp_iters=config.mean_loops_ramp_iters)

    @property
    def ramps(self) -> bool:
        """Whether the mean moves over training (a depth curriculum)."""
        return self.schedule != "constant"

    def mean_at(self, iteration: int) -> float:
        """The mean the draws of training step ``iteration`` are made around (module docstring);
        exactly ``mean`` without a ramp or once it is over, so those draws are the constant's."""
        if not self.ramps or iteration >= self.ramp_iters:
            return self.mean
        progress = iteration / self.ramp_iters
        return self.start + (self.mean - self.start) * RAMPS[self.schedule](progress)

    @property
    def varies(self) -> bool:
        """Whether a step may run another depth than the layout's K, or truncate the backprop."""
        return (self.sampler != "fixed" or self.backprop is not None or self.ramps
                or round(self.mean) != self.trained)

    @property
    def grad_steps_vary(self) -> bool:
        """Whether the number of loop steps with gradients changes from step to step: a
        sampled or ramping depth (which may run 1 step) with all steps, or with more than the
        last one."""
        changes = self.sampler != "fixed" or self.ramps
        return changes and (self.backprop is None or self.backprop > 1)

    def draw(self, seed: int, iteration: int, rows: Sequence[int] = (), seq_length: int = 0,
             graph_steps: Optional[Tuple[int, int]] = None) -> LoopDraw:
        """The depth of training step ``iteration``; per sequence or token, that of the global
        batch's sequences ``rows`` (of ``seq_length`` tokens). ``graph_steps`` (``graph_steps``): laid
        out on a fixed graph, every element masked into it (pipeline parallelism)."""
        mean = self.mean_at(iteration)
        if self.per == "batch":
            steps = self._capped(self._steps(np.random.default_rng([seed, iteration]), mean))
            if graph_steps is None:
                return LoopDraw(int(steps), int(self._grad(steps)))
            steps = np.full(len(rows), steps)
        else:
            steps = self._element_steps(seed, iteration, rows, seq_length, mean)
        return LoopDraw.of_elements(steps, self._grad(steps), graph_steps)

    @property
    def graph_steps(self) -> Tuple[int, int]:
        """(steps without, steps with gradients) of the fixed graph of the layout's K steps that
        a pipeline runs every draw on: the last ``backprop`` (default all) carry gradients."""
        grad = self.trained if self.backprop is None else min(self.backprop, self.trained)
        return self.trained - grad, grad

    def _element_steps(self, seed: int, iteration: int, rows: Sequence[int], seq_length: int,
                       mean: float) -> np.ndarray:
        """Steps of each sequence ([b]) or token ([b, s]) of the global batch's ``rows``."""
        size = (seq_length,) if self.per == "token" else None
        return np.stack([self._capped(self._steps(np.random.default_rng([seed, iteration, g]), mean, size))
                         for g in rows])

    def _steps(self, rng: np.random.Generator, mean: float, size=None):
        if self.sampler == "fixed":
            return np.full(size, int(round(mean))) if size else int(round(mean))
        if self.sampler == "poisson_lognormal":
            tau = rng.lognormal(math.log(mean) - self.sigma ** 2 / 2, self.sigma, size)
            return rng.poisson(tau) + 1
        return np.maximum(rng.poisson(mean, size), 1)

    def _capped(self, steps):
        return steps if self.max is None else np.minimum(steps, self.max)

    def _grad(self, steps):
        return steps if self.backprop is None else np.minimum(steps, self.backprop)

    def expected(self, draws: int = EXPECTED_DRAWS, seed: int = 0) -> "MeanDepth":
        """Mean steps and mean gradient steps over ``draws`` draws (for the expected cost: per
        sequence or token the same distribution, counted per element); under a depth curriculum
        those around ``mean``, once the ramp is over (what the rest of the run costs)."""
        batch = replace(self, per="batch", schedule="constant")
        sample = [batch.draw(seed, i) for i in range(draws)]
        return MeanDepth(sum(d.num_loops for d in sample) / draws,
                         sum(d.backprop_loops for d in sample) / draws)


@dataclass(frozen=True)
class MeanDepth:
    """Loop steps and steps with gradients, averaged (over draws, or a batch's elements)."""

    num_loops: float
    backprop_loops: float
