"""MeSH router statistics and the state scheme's own scalars (``StateScheme.metrics``, e.g. the
diagonal injection's spectral radius under ``mesh/scheme/...``) in the training log
(TensorBoard / W&B), at every log interval.

On the rank that owns the log writers (megatron's last rank), the first micro-batch of each
logged step records the block's states and ``megatron_mesh.probing.routers.router_summary``
turns them into scalars under ``mesh/router/...``: read/write entropies, slot usage and the
mean Eq. 7 coefficients per step. The cost is two Linear(h -> B) per loop step on one
micro-batch per log interval; nothing is all-reduced, so the values describe that rank's
tokens (one data-parallel shard). Under pipeline parallelism only the steps the last stage
runs from the loop's start are logged (usually none: it does not see the loop begin).
"""

from __future__ import annotations

from typing import List, Optional

import torch


class RouterLog:
    """Records and writes router statistics once per log interval when ``enabled``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.logged_iteration: Optional[int] = None

    def states_for(self, model) -> Optional[List]:
        """A list to pass as ``states=`` when this micro-batch should be logged, else None."""
        from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer

        if not (self.enabled and model.training):
            return None
        if get_tensorboard_writer() is None and get_wandb_writer() is None:
            return None
        args = get_args()
        iteration = args.curr_iteration + 1  # the number training_log will report this step as
        if iteration % args.log_interval or iteration == self.logged_iteration:
            return None
        self.logged_iteration = iteration
        return []

    def write(self, model, states: Optional[List]) -> None:
        from megatron.training import get_tensorboard_writer, get_wandb_writer

        from megatron_mesh.probing.routers import block_scheme, router_summary

        if not states:
            return
        summary = {f"mesh/router/{k[len('mesh/'):]}": v for k, v in router_summary(model, states).items()}
        scheme = block_scheme(model)
        metrics = scheme.metrics() if scheme is not None else {}
        summary.update({f"mesh/scheme/{k}": v for k, v in metrics.items()})
        numbers = torch.stack([v.float() for v in summary.values()]).tolist() if summary else []  # one sync
        values = dict(zip(summary, numbers))
        writer, wandb = get_tensorboard_writer(), get_wandb_writer()
        if writer:
            for key, value in values.items():
                writer.add_scalar(key, value, self.logged_iteration)
        if wandb and values:
            wandb.log(values, self.logged_iteration)

