"""What crosses a pipeline stage boundary: the block's carry, packed into one tensor.

The carry is packed along the hidden dimension into one [s, b, W] tensor: h and h_emb before the
loop; h, h(t) and the loop state the scheme's steps read inside it (the LoopState packs itself:
``mesh.LoopState.slices``); h alone after it. W is the widest carry of the run's split
(``carry_width``; narrower carries are zero-padded), so every send has one shape known in advance
and megatron-core's schedules need no shape exchange (``config.pipeline_carry_width``,
compat.megatron_fixes).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from megatron_mesh.mesh import LoopState, loop_state_fields
from megatron_mesh.parallel.stages import boundary_phase, num_stages
from megatron_mesh.unrolled import stage_bounds


def carried_fields(phase: str, scheme: str) -> Tuple[str, ...]:
    """What crosses a boundary in ``phase`` for state scheme ``scheme``: h (and h_emb, which
    the loop's start reads) before the loop; h, h(t) and what the scheme's steps read inside it;
    h after it."""
    if phase == "pre":
        return ("h",) if scheme == "vanilla" else ("h", "h_emb")
    if phase == "loop":
        return ("h", "h_loop") + loop_state_fields(scheme)
    return ("h",)


def carry_slices(phase: str, config) -> int:
    """[s, b, h] slices in the carry of a ``phase`` boundary."""
    if phase != "loop":
        return len(carried_fields(phase, config.state_scheme))
    return 2 + LoopState.slice_count(loop_state_fields(config.state_scheme), config.buffer_slots)


def carry_width(config) -> int:
    """The last dimension of what every boundary of this split sends: the widest carry (the
    others are zero-padded to it), so megatron's schedules can send one fixed shape without
    exchanging shapes first (a blocking handshake and a device sync per send)."""
    layout = config.parsed_layout
    bounds = stage_bounds(layout.n_compute, num_stages(config), config.pipeline_stage_layers)
    phases = [boundary_phase(config, end) for _, end in bounds[:-1]]
    return config.hidden_size * max(carry_slices(phase, config) for phase in phases)


def pack(carry: Dict[str, object], phase: str, config) -> Tensor:
    """The carry as one tensor [s, b, W] for the next stage, W = config.pipeline_carry_width
    (zero-padded to it; unpadded when it is None)."""
    if phase == "loop":
        state: LoopState = carry["state"]
        parts = [carry["h"], carry["h_loop"], *state.slices(loop_state_fields(config.state_scheme))]
    else:
        parts = [carry[name] for name in carried_fields(phase, config.state_scheme)]
    used = sum(part.shape[-1] for part in parts)
    width = config.pipeline_carry_width or used
    if width > used:
        parts.append(parts[0].new_zeros((*parts[0].shape[:-1], width - used)))
    return torch.cat(parts, dim=-1)


def unpack(packed: Tensor, phase: str, config) -> Dict[str, object]:
    """The inverse of ``pack`` on the receiving stage (the padding is dropped)."""
    chunks = packed.split(config.hidden_size, dim=-1)[:carry_slices(phase, config)]
    if phase != "loop":
        return dict(zip(carried_fields(phase, config.state_scheme), chunks))
    state = LoopState.from_slices(loop_state_fields(config.state_scheme), chunks[2:])
    return {"h": chunks[0], "h_loop": chunks[1], "state": state}
