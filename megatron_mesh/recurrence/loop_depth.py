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

Every draw is a function of (seed, iteration[, g]) only, so every rank of a step (TP, DP, and a
resumed run) draws the same depth for the same data without communicating, and a sequence gets
the same depth whichever data-parallel rank and micro-batch it lands in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import numpy as np

DEPTH_SAMPLERS = ("fixed", "poisson_lognormal", "poisson")

DEPTH_UNITS = ("batch", "sequence", "token")
"""What one depth draw covers (module docstring)."""

EXPECTED_DRAWS = 20000
"""Draws ``LoopDepth.expected`` averages (the expected cost ``model_stats`` reports)."""

HUGINN_SIGMA = 0.5
"""The log-normal's sigma in Huginn's sampler (hard-coded there)."""


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

    @classmethod
    def of(cls, config) -> "LoopDepth":
        """From a MeshConfig (its loop_depth, mean_loops, max_loops, backprop_loops,
        loop_depth_per)."""
        return cls(config.loop_depth, config.mean_loops, config.num_loops, config.max_loops,
                   config.backprop_loops, per=config.loop_depth_per)

    @property
    def varies(self) -> bool:
        """Whether a step may run another depth than the layout's K, or truncate the backprop."""
        return (self.sampler != "fixed" or self.backprop is not None
                or round(self.mean) != self.trained)

    @property
    def grad_steps_vary(self) -> bool:
        """Whether the number of loop steps with gradients changes from step to step: a
        sampled depth (which may draw 1) with all steps, or with more than the last one."""
        return self.sampler != "fixed" and (self.backprop is None or self.backprop > 1)

    def draw(self, seed: int, iteration: int, rows: Sequence[int] = (), seq_length: int = 0,
             graph_steps: Optional[Tuple[int, int]] = None) -> LoopDraw:
        """The depth of training step ``iteration``; per sequence or token, that of the global
        batch's sequences ``rows`` (of ``seq_length`` tokens). ``graph_steps`` (``graph_steps``): laid
        out on a fixed graph, every element masked into it (pipeline parallelism)."""
        if self.per == "batch":
            steps = self._capped(self._steps(np.random.default_rng([seed, iteration])))
            if graph_steps is None:
                return LoopDraw(int(steps), int(self._grad(steps)))
            steps = np.full(len(rows), steps)
        else:
            steps = self._element_steps(seed, iteration, rows, seq_length)
        return LoopDraw.of_elements(steps, self._grad(steps), graph_steps)

    @property
    def graph_steps(self) -> Tuple[int, int]:
        """(steps without, steps with gradients) of the fixed graph of the layout's K steps that
        a pipeline runs every draw on: the last ``backprop`` (default all) carry gradients."""
        grad = self.trained if self.backprop is None else min(self.backprop, self.trained)
        return self.trained - grad, grad

    def _element_steps(self, seed: int, iteration: int, rows: Sequence[int],
                       seq_length: int) -> np.ndarray:
        """Steps of each sequence ([b]) or token ([b, s]) of the global batch's ``rows``."""
        size = (seq_length,) if self.per == "token" else None
        return np.stack([self._capped(self._steps(np.random.default_rng([seed, iteration, g]), size))
                         for g in rows])

    def _steps(self, rng: np.random.Generator, size=None):
        if self.sampler == "fixed":
            return np.full(size, int(round(self.mean))) if size else int(round(self.mean))
        if self.sampler == "poisson_lognormal":
            tau = rng.lognormal(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma, size)
            return rng.poisson(tau) + 1
        return np.maximum(rng.poisson(self.mean, size), 1)

    def _capped(self, steps):
        return steps if self.max is None else np.minimum(steps, self.max)

    def _grad(self, steps):
        return steps if self.backprop is None else np.minimum(steps, self.backprop)

    def expected(self, draws: int = EXPECTED_DRAWS, seed: int = 0) -> "MeanDepth":
        """Mean steps and mean gradient steps over ``draws`` draws (for the expected cost: per
        sequence or token the same distribution, counted per element)."""
        batch = replace(self, per="batch")
        sample = [batch.draw(seed, i) for i in range(draws)]
        return MeanDepth(sum(d.num_loops for d in sample) / draws,
                         sum(d.backprop_loops for d in sample) / draws)


@dataclass(frozen=True)
class MeanDepth:
    """Loop steps and steps with gradients, averaged (over draws, or a batch's elements)."""

    num_loops: float
    backprop_loops: float
