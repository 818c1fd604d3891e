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

from torch import Tensor

from megatron_mesh.recurrence.layout import Layout
from megatron_mesh.recurrence.mesh import LoopState


@dataclass(frozen=True)
class Op:
    """One operation of the unrolled graph."""

    kind: str
    """'layer', or a scheme operation: 'begin' (after the prelude), 'inject' (the core's input
    at step t), 'step' (after the core at step t) or 'end' (after the loop)."""
    segment: str = ""
    """For layers: 'prelude', 'core' or 'coda'."""
    module: int = 0
    """For core layers: which core module holds the weights (0 when tied)."""
    index: int = 0
    """For layers: the layer's index in its module. For 'inject' and 'step': the loop step t."""
    position: int = -1
    """For layers: the application number in the unrolled graph."""
    loop: int = -1
    """The loop step t a core layer, 'inject' or 'step' belongs to; -1 outside the loop."""


def unrolled_ops(layout: Layout, num_loops: Optional[int] = None) -> List[Op]:
    """Every operation of the forward pass, in order (``num_loops`` overrides K)."""
    K = layout.num_loops if num_loops is None else num_loops
    ops: List[Op] = []

    positions = itertools.count()

    def layer(segment: str, index: int, module: int = 0, loop: int = -1) -> None:
        ops.append(Op("layer", segment, module, index, next(positions), loop))

    for i in range(layout.prelude):
        layer("prelude", i)
    if layout.recursive:
        ops.append(Op("begin"))
        for t in range(K):
            module = 0 if layout.tied else t
            ops.append(Op("inject", index=t, loop=t))
            for j in range(layout.core[module]):
                layer("core", j, module, loop=t)
            ops.append(Op("step", index=t, loop=t))
        ops.append(Op("end"))
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


RUN_WITH_NEXT_LAYER = ("begin", "inject")
"""Scheme operations a stage runs with the layer application after them (the others, 'step' and
'end', with the one before: so a loop of 0 steps runs on the stage after the prelude)."""


def stage_ops(ops: List[Op], start: int, end: int) -> List[Op]:
    """The operations a stage holding layer applications [start, end) runs: its layers and the
    scheme operations that go with them (RUN_WITH_NEXT_LAYER)."""
    positions = _anchor_positions(ops)
    return [op for op, position in zip(ops, positions) if start <= position < end]


def _anchor_positions(ops: List[Op]) -> List[int]:
    """The layer application each op runs with: its own, the next one (RUN_WITH_NEXT_LAYER; the
    last layer if none follows) or the previous one (the first layer if none precedes)."""
    layers = [op.position for op in ops if op.kind == "layer"]
    out, done = [], 0
    for op in ops:
        if op.kind == "layer":
            out.append(op.position)
            done += 1
        elif op.kind in RUN_WITH_NEXT_LAYER:
            out.append(layers[min(done, len(layers) - 1)])
        else:
            out.append(layers[max(done - 1, 0)])
    return out


def phase_before(ops: List[Op], start: int) -> str:
    """'pre' (loop not begun), 'loop' or 'post' (loop done) at the boundary before application
    ``start``: what the previous pipeline stage hands over (ops grouped as in ``stage_ops``)."""
    done = [op.kind for op in stage_ops(ops, 0, start) if op.kind != "layer"]
    if not done:
        return "pre"
    return "post" if done[-1] == "end" else "loop"


def loop_step_cut_at(ops: List[Op], start: int) -> Optional[int]:
    """The loop step t a stage boundary before layer application ``start`` cuts (its layers on
    both sides), or None."""
    layers = {op.position: op for op in ops if op.kind == "layer"}
    before, after = layers.get(start - 1), layers.get(start)
    if before is not None and after is not None and before.loop == after.loop >= 0:
        return after.loop
    return None


@dataclass
class Carry:
    """What flows along the unrolled graph from one op to the next, and (packed by
    parallel/carry.py) from one pipeline stage to the next."""

    h: Tensor
    """[s, b, h] the running hidden state."""
    h_emb: Optional[Tensor] = None
    """[s, b, h] before the loop: the embeddings the scheme's ``begin`` reads."""
    h_loop: Optional[Tensor] = None
    """[s, b, h] in the loop: the core's input at this step (what its ``step`` reads as h)."""
    state: Optional[LoopState] = None
    """In the loop: the scheme's state."""
