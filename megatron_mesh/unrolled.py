"""The unrolled graph of a Prelude-Recurrent-Coda model as a list of operations.

The block executes this list; a pipeline stage executes a contiguous slice of it. Layer
applications are numbered 0..N_compute-1 in execution order; the state-scheme operations sit
between them: ``begin`` right before the first core application, ``step t`` right after the
last layer of loop step t.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron_mesh.layout import Layout


@dataclass(frozen=True)
class Op:
    """One operation of the unrolled graph."""

    kind: str
    """'layer', 'begin' (scheme start after the prelude) or 'step' (scheme after step t)."""
    segment: str = ""
    """For layers: 'prelude', 'core' or 'coda'."""
    module: int = 0
    """For core layers: which core module holds the weights (0 when tied)."""
    index: int = 0
    """For layers: the layer's index in its module. For 'step': the loop step t."""
    position: int = -1
    """For layers: the application number in the unrolled graph."""


def unrolled_ops(layout: Layout, num_loops: Optional[int] = None) -> List[Op]:
    """Every operation of the forward pass, in order (``num_loops`` overrides K)."""
    K = layout.num_loops if num_loops is None else num_loops
    ops: List[Op] = []

    positions = itertools.count()

    def layer(segment: str, index: int, module: int = 0) -> None:
        ops.append(Op("layer", segment, module, index, next(positions)))

    for i in range(layout.prelude):
        layer("prelude", i)
    if layout.recursive:
        ops.append(Op("begin"))
        for t in range(K):
            module = 0 if layout.tied else t
            for j in range(layout.core[module]):
                layer("core", j, module)
            ops.append(Op("step", index=t))
    for i in range(layout.coda):
        layer("coda", i)
    return ops


def stage_bounds(n_compute: int, stages: int, stage_layers: Optional[Sequence[int]] = None
                 ) -> List[Tuple[int, int]]:
    """[start, end) layer applications of each pipeline stage: ``stage_layers`` or an even split."""
    if stage_layers is None:
        if n_compute % stages:
            raise ValueError(f"N_compute={n_compute} layer applications do not split evenly over "
                             f"{stages} pipeline stages: set pipeline_stage_layers, e.g. "
                             f"{_suggest(n_compute, stages)}")
        stage_layers = [n_compute // stages] * stages
    if len(stage_layers) != stages or sum(stage_layers) != n_compute or min(stage_layers) < 1:
        raise ValueError(f"pipeline_stage_layers={list(stage_layers)}: expected {stages} positive "
                         f"counts summing to N_compute={n_compute}")
    bounds, start = [], 0
    for count in stage_layers:
        bounds.append((start, start + count))
        start += count
    return bounds


def _suggest(n: int, stages: int) -> List[int]:
    base, extra = divmod(n, stages)
    return [base + (1 if s >= stages - extra else 0) for s in range(stages)]


def stage_ops(ops: List[Op], start: int, end: int) -> List[Op]:
    """The operations a stage holding layer applications [start, end) runs: its layers, 'begin'
    when it runs the first core application, 'step t' when it runs step t's last layer."""
    out: List[Op] = []
    for i, op in enumerate(ops):
        if op.kind == "layer":
            if start <= op.position < end:
                out.append(op)
        elif op.kind == "begin":
            following = next(o for o in ops[i:] if o.kind == "layer")
            if start <= following.position < end:
                out.append(op)
        else:  # step: belongs with the layer before it
            previous = next(o for o in reversed(ops[:i]) if o.kind == "layer")
            if start <= previous.position < end:
                out.append(op)
    return out


def phase_before(ops: List[Op], start: int) -> str:
    """'pre' (loop not begun), 'loop' or 'post' (loop done) at the boundary before application
    ``start``: what the previous pipeline stage hands over. 'begin' runs with the application
    after it, 'step' with the one before it (as in ``stage_ops``)."""
    done = [op for op in stage_ops(ops, 0, start) if op.kind != "layer"]
    if not done:
        return "pre"
    last_step = [op for op in ops if op.kind == "step"][-1:]
    return "post" if last_step and done[-1] == last_step[0] else "loop"
