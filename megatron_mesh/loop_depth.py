"""Loop depth as a training dimension: how many loop steps a training step runs, and through
how many of the last ones the gradient flows (truncated backprop).

Samplers (``MeshConfig.loop_depth``), one draw per training step for the whole global batch:
- ``fixed``: round(mean) steps, every step;
- ``poisson_lognormal`` (Huginn, recpre/model_dynamic.py 'poisson-lognormal-filling'):
  tau ~ LogNormal(log(mean) - sigma^2 / 2, sigma), so E[tau] = mean; steps = Poisson(tau) + 1;
- ``poisson`` (Parcae, models/parcae/parcae.py ``_sample_batch_depths``, here per batch):
  steps = max(Poisson(mean), 1).
``max`` caps the draw (neither source has one; a cap bounds activation memory). The gradient
flows through the last min(backprop, steps) steps; the others run without an autograd graph.

The draw is a function of (seed, iteration) only, so every rank of a step (TP, DP, and a
resumed run) draws the same depth without communicating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

DEPTH_SAMPLERS = ("fixed", "poisson_lognormal", "poisson")

HUGINN_SIGMA = 0.5
"""The log-normal's sigma in Huginn's sampler (hard-coded there)."""


@dataclass(frozen=True)
class LoopDraw:
    """One training step's depth."""

    num_loops: int
    """Loop steps run."""
    grad_loops: int
    """The last ``grad_loops`` of them carry gradients."""


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

    @classmethod
    def of(cls, config) -> "LoopDepth":
        """From a MeshConfig (its loop_depth, mean_loops, max_loops, backprop_loops)."""
        return cls(config.loop_depth, config.mean_loops, config.num_loops, config.max_loops,
                   config.backprop_loops)

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

    def draw(self, seed: int, iteration: int) -> LoopDraw:
        rng = np.random.default_rng([seed, iteration])
        steps = self._steps(rng)
        if self.max is not None:
            steps = min(steps, self.max)
        grad = steps if self.backprop is None else min(self.backprop, steps)
        return LoopDraw(steps, grad)

    def _steps(self, rng: np.random.Generator) -> int:
        if self.sampler == "fixed":
            return int(round(self.mean))
        if self.sampler == "poisson_lognormal":
            tau = rng.lognormal(math.log(self.mean) - self.sigma ** 2 / 2, self.sigma)
            return int(rng.poisson(tau)) + 1
        return max(int(rng.poisson(self.mean)), 1)

    def expected(self, draws: int = 20000, seed: int = 0) -> "ExpectedDepth":
        """Mean steps and mean gradient steps over ``draws`` draws (for the expected cost)."""
        sample = [self.draw(seed, i) for i in range(draws)]
        return ExpectedDepth(sum(d.num_loops for d in sample) / draws,
                             sum(d.grad_loops for d in sample) / draws)


@dataclass(frozen=True)
class ExpectedDepth:
    num_loops: float
    grad_loops: float
