"""Pipeline parallelism over the unrolled graph.

Stage s runs layer applications [start, end) of ``megatron_mesh.unrolled`` (an even split or
``pipeline_stage_layers``). What crosses a stage boundary is the block's carry, packed along the
hidden dimension into one [s, b, W] tensor: h and h_emb before the loop; h, h(t) and what the
scheme's steps read inside it (MeSH: the B buffer slots; anchor: h(0); anchor*: h_emb); h
alone after it. W is the widest carry of the run's split (``carry_width``; narrower carries
are zero-padded), so every send has one shape known in advance and megatron-core's schedules
need no shape exchange (``config.pipeline_carry_width``, compat.megatron_fixes).

With virtual pipelining (megatron-core's interleaved schedule) each rank runs several stages,
one model chunk each: chunk v of rank r runs stage v * pp + r.

Core layers (and the state scheme) that several stages run are one weight. Within a rank the
chunks share one parameter. Across ranks the copies are replicas: the same at initialisation
(broadcast from the rank of the first stage using them), their gradients summed over the ranks
holding them before megatron-core's data-parallel reduction, counted once in the grad norm
(``param.shared`` on the other ranks) and saved once (replica ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_mesh.mesh import LoopState, loop_state_fields
from megatron_mesh.unrolled import phase_before, stage_bounds, stage_ops, unrolled_ops

REPLICA = "mesh_replica"
"""Parameter attribute: the ``Replica`` record of a weight held by several ranks."""

TIED_COPY = "mesh_tied_copy"
"""Module attribute: True on a layer (or scheme) computing with an earlier chunk's parameters."""


STATE_FIELDS = ("h_emb", "h0", "buffer")
"""Carry fields held in the LoopState inside the loop (before it, h_emb is the carry's own)."""


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
    """[s, b, h] slices in the carry of a ``phase`` boundary (the MeSH buffer counts B)."""
    fields = carried_fields(phase, config.state_scheme)
    return len(fields) + (config.buffer_slots - 1 if "buffer" in fields else 0)


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
    state: Optional[LoopState] = carry.get("state")
    parts = []
    for name in carried_fields(phase, config.state_scheme):
        value = getattr(state, name) if name in STATE_FIELDS and state is not None else carry[name]
        parts.extend(value.unbind(0) if name == "buffer" else [value])
    used = sum(part.shape[-1] for part in parts)
    width = config.pipeline_carry_width or used
    if width > used:
        parts.append(parts[0].new_zeros((*parts[0].shape[:-1], width - used)))
    return torch.cat(parts, dim=-1)


def unpack(packed: Tensor, phase: str, config) -> Dict[str, object]:
    """The inverse of ``pack`` on the receiving stage (the padding is dropped)."""
    fields = carried_fields(phase, config.state_scheme)
    chunks = packed.split(config.hidden_size, dim=-1)[:carry_slices(phase, config)]
    values = dict(zip(fields, chunks))
    if phase != "loop":
        return values
    buffer = torch.stack(chunks[len(fields) - 1:], dim=0) if "buffer" in fields else None
    state = LoopState(h_emb=values.get("h_emb"), h0=values.get("h0"), buffer=buffer)
    return {"h": values["h"], "h_loop": values["h_loop"], "state": state}


def num_stages(config) -> int:
    """Pipeline stages of the unrolled graph: ranks x virtual stages (model chunks) per rank."""
    return config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)


def stage_index(config, pp_rank: int, vp_stage: Optional[int]) -> int:
    """megatron-core's interleaved order: model chunk v of rank r runs stage v * pp + r."""
    return (vp_stage or 0) * config.pipeline_model_parallel_size + pp_rank


def stage_of(config, stage: int) -> Tuple[int, int]:
    n = config.parsed_layout.n_compute
    return stage_bounds(n, num_stages(config), config.pipeline_stage_layers)[stage]


def weight_holders(config) -> Dict[str, FrozenSet[int]]:
    """Module path (within the block) -> the stages that build it, for every layer and the
    scheme; replicated weights are those with more than one holder."""
    layout = config.parsed_layout
    ops = unrolled_ops(layout)
    holders: Dict[str, set] = {}
    for stage, (start, end) in enumerate(stage_bounds(layout.n_compute, num_stages(config),
                                                      config.pipeline_stage_layers)):
        for op in stage_ops(ops, start, end):
            if op.kind == "layer":
                path = (f"cores.{op.module}.{op.index}" if op.segment == "core"
                        else f"{op.segment}.{op.index}")
            else:
                path = "scheme"
            holders.setdefault(path, set()).add(stage)
    return {path: frozenset(stages) for path, stages in holders.items()}


def boundary_phase(config, position: int) -> str:
    return phase_before(unrolled_ops(config.parsed_layout), position)


@dataclass(frozen=True)
class Replica:
    """Parameter attribute (``REPLICA``) of one rank's copy of a weight several ranks hold."""

    key: str
    """The weight's name within the block, the same on every copy."""
    group: object
    """Process group of the pipeline ranks holding copies."""
    index: int
    """0 on the rank running the first stage that uses the weight (the main copy), else 1, 2..."""


def connect_replicas(blocks: Sequence[nn.Module], config, pp_group) -> None:
    """Tie the copies of every weight several stages hold. ``blocks`` are this rank's model
    chunks (chunk v runs stage v * pp + rank).

    Copies in two chunks of this rank (virtual pipelining) become one parameter: the later
    chunk's module uses the earlier chunk's tensors without registering them, so autograd sums
    both uses into one gradient and the optimizer and checkpoint see the weight once per rank.
    Copies on other ranks are replicas: equal at start (broadcast from the main copy), marked
    with their ``Replica`` (for ``sum_replica_grads`` and checkpoint replica ids) and, except
    the main copy, ``shared`` (megatron-core leaves them out of the grad norm)."""
    pp_size, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    holders = {p: sorted(s) for p, s in weight_holders(config).items() if len(s) > 1}
    groups = _holder_groups(sorted({_ranks(s, pp_size) for s in holders.values()}), pp_group)
    for path in sorted(holders):
        stages = holders[path]
        copies = [blocks[s // pp_size].get_submodule(path) for s in stages if s % pp_size == pp_rank]
        if not copies:
            continue
        for duplicate in copies[1:]:
            _borrow_parameters(duplicate, copies[0])
        ranks = _ranks(stages, pp_size)
        if len(ranks) == 1:
            continue
        main_rank = stages[0] % pp_size
        index = 0 if pp_rank == main_rank else 1 + [r for r in ranks if r != main_rank].index(pp_rank)
        for name, param in copies[0].named_parameters():
            _broadcast(param.data, dist.get_global_rank(pp_group, main_rank), groups[ranks])
            setattr(param, REPLICA, Replica(f"{path}.{name}", groups[ranks], index))
            if index > 0:
                param.shared = True


@torch.no_grad()
def _broadcast(tensor: Tensor, src: int, group) -> None:
    """dist.broadcast through the backend's device: models are built before megatron's
    get_model moves them to the GPU, and some modules (torch LayerNorm) start on the CPU."""
    if dist.get_backend(group) != "nccl" or tensor.is_cuda:
        dist.broadcast(tensor, src=src, group=group)
        return
    staged = tensor.to(torch.cuda.current_device())
    dist.broadcast(staged, src=src, group=group)
    tensor.copy_(staged)


def _borrow_parameters(module: nn.Module, owner: nn.Module) -> None:
    """Make ``module`` compute with ``owner``'s parameters, which stay registered in ``owner``
    only (plain attributes here, found before nn.Module's parameter lookup)."""
    setattr(module, TIED_COPY, True)
    for name, param in owner.named_parameters():
        holder_path, _, attr = name.rpartition(".")
        holder = module.get_submodule(holder_path) if holder_path else module
        del holder._parameters[attr]
        object.__setattr__(holder, attr, param)


def _ranks(stages, pp_size: int) -> Tuple[int, ...]:
    return tuple(sorted({s % pp_size for s in stages}))


def _holder_groups(rank_sets: List[Tuple[int, ...]], pp_group) -> Dict[Tuple[int, ...], object]:
    """One process group per set of (two or more) pipeline ranks, within each pipeline group;
    every rank creates every group in the same order, as torch.distributed requires."""
    own = dist.get_process_group_ranks(pp_group)
    everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, own)
    pipelines = sorted({tuple(ranks) for ranks in everyone})
    mine = {}
    for ranks in (r for r in rank_sets if len(r) > 1):
        for pipeline in pipelines:
            group = dist.new_group([pipeline[r] for r in ranks])
            if tuple(own) == pipeline:
                mine[ranks] = group
    return mine


def sum_replica_grads(model_chunks: Sequence[nn.Module]) -> None:
    """Sum each replicated weight's gradient over the ranks holding it. Runs before megatron's
    data-parallel reduction (sums commute), so it sees every rank's full local gradient."""
    by_group: Dict[object, List[Tuple[str, Tensor]]] = {}
    for chunk in model_chunks:
        for param in chunk.parameters():
            replica = getattr(param, REPLICA, None)
            if replica is not None:
                grad = param.main_grad if hasattr(param, "main_grad") else param.grad
                by_group.setdefault(replica.group, []).append((replica.key, grad))
    # every rank of a group reduces the same groups and tensors in the same order
    for group in sorted(by_group, key=dist.get_process_group_ranks):
        grads = [grad for _, grad in sorted(by_group[group], key=lambda item: item[0])]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def replica_index(param: Tensor) -> int:
    """0 for the main copy of a weight (or one no other stage holds), else the copy's index."""
    replica = getattr(param, REPLICA, None)
    return 0 if replica is None else replica.index
