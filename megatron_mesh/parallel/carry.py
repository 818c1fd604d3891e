"""What crosses a pipeline stage boundary: the block's carry, packed into one tensor.

The carry (recurrence.unrolled.Carry) is packed along the hidden dimension into one [s, b, W] tensor: h and
h_emb before the loop; h, h_loop and the loop state the scheme's steps read inside it (the scheme
class says which fields, ``schemes.carried_state``; the LoopState packs them itself); h alone
after it. W is the widest carry of the run's split (``carry_width``; narrower carries are
zero-padded), so every send has one shape known in advance and megatron-core's schedules need no
shape exchange (``config.pipeline_carry_width``, training.megatron_fixes).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from megatron_mesh.parallel.stages import boundary_phase, num_stages
from megatron_mesh.recurrence.mesh import LoopState
from megatron_mesh.recurrence.schemes import carried_state
from megatron_mesh.recurrence.unrolled import Carry, stage_bounds


def carried_fields(phase: str, scheme: str) -> Tuple[str, ...]:
    """The Carry fields a ``phase`` boundary sends (the loop state besides, inside the loop)."""
    if phase == "pre":
        return ("h",) if scheme == "vanilla" else ("h", "h_emb")
    return ("h", "h_loop") if phase == "loop" else ("h",)


def carry_slices(phase: str, config) -> int:
    """[s, b, h] slices in the carry of a ``phase`` boundary."""
    state = (LoopState.slice_count(carried_state(config.state_scheme), config.buffer_slots)
             if phase == "loop" else 0)
    return len(carried_fields(phase, config.state_scheme)) + state


def carry_width(config) -> int:
    """The last dimension of what every boundary of this split sends: the widest carry (the
    others are zero-padded to it), so megatron's schedules can send one fixed shape without
    exchanging shapes first (a blocking handshake and a device sync per send)."""
    layout = config.parsed_layout
    bounds = stage_bounds(layout.n_compute, num_stages(config), config.pipeline_stage_layers)
    phases = [boundary_phase(config, end) for _, end in bounds[:-1]]
    return config.hidden_size * max(carry_slices(phase, config) for phase in phases)


def pack(carry: Carry, phase: str, config) -> Tensor:
    """The carry as one tensor [s, b, W] for the next stage, W = config.pipeline_carry_width
    (zero-padded to it; unpadded when it is None)."""
    parts = [getattr(carry, name) for name in carried_fields(phase, config.state_scheme)]
    if phase == "loop":
        parts += carry.state.slices(carried_state(config.state_scheme))
    used = sum(part.shape[-1] for part in parts)
    width = config.pipeline_carry_width or used
    if width > used:
        parts.append(parts[0].new_zeros((*parts[0].shape[:-1], width - used)))
    return torch.cat(parts, dim=-1)


def unpack(packed: Tensor, phase: str, config) -> Carry:
    """The inverse of ``pack`` on the receiving stage (the padding is dropped)."""
    chunks = packed.split(config.hidden_size, dim=-1)[:carry_slices(phase, config)]
    names = carried_fields(phase, config.state_scheme)
    carry = Carry(**dict(zip(names, chunks)))
    if phase == "loop":
        carry.state = LoopState.from_slices(carried_state(config.state_scheme), chunks[len(names):])
    return carry
