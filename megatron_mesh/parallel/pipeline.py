"""Pipeline parallelism over the unrolled graph.

Stage s runs layer applications [start, end) of ``megatron_mesh.unrolled`` (an even split or
``pipeline_stage_layers``). What crosses a stage boundary is the block's carry, packed along the
hidden dimension into one [s, b, n*h] tensor (megatron-core's schedules exchange its shape
because the model config sets ``variable_seq_lengths``): h and h_emb before the loop; h, h(t),
h_emb, h(0) and, for MeSH, the B buffer slots inside it; h alone after it.

Core layers (and the state scheme) that several stages run are replicas of one weight: the same
at initialisation (broadcast from the first stage holding them), their gradients summed over
the stages holding them before megatron-core's data-parallel reduction, counted once in the grad
norm (``param.shared`` on the other holders) and saved once (replica ids).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_mesh.mesh import LoopState
from megatron_mesh.unrolled import phase_before, stage_bounds, stage_ops, unrolled_ops

HOLDER_GROUP = "mesh_stage_holders"
"""Parameter attribute: (process group, holder index) of a weight held by several stages."""


def carried_fields(phase: str, recursive: bool, mesh: bool) -> Tuple[str, ...]:
    if phase == "pre":
        return ("h", "h_emb") if recursive else ("h",)
    if phase == "loop":
        return ("h", "h_loop", "h_emb", "h0") + (("buffer",) if mesh else ())
    return ("h",)


def pack(carry: Dict[str, object], phase: str, recursive: bool, mesh: bool) -> Tensor:
    """The carry as one tensor [s, b, n*h] for the next stage."""
    state: Optional[LoopState] = carry.get("state")
    parts = []
    for name in carried_fields(phase, recursive, mesh):
        if name in ("h_emb", "h0", "buffer") and state is not None:
            value = getattr(state, name)
        else:
            value = carry[name]
        parts.extend(value.unbind(0) if name == "buffer" else [value])
    return torch.cat(parts, dim=-1)


def unpack(packed: Tensor, phase: str, recursive: bool, mesh: bool, hidden: int) -> Dict[str, object]:
    """The inverse of ``pack`` on the receiving stage."""
    chunks = list(packed.split(hidden, dim=-1))
    fields = carried_fields(phase, recursive, mesh)
    values = dict(zip(fields, chunks))
    if phase != "loop":
        return values
    buffer = torch.stack(chunks[len(fields) - 1:], dim=0) if mesh else None
    state = LoopState(h_emb=values["h_emb"], h0=values["h0"], buffer=buffer)
    return {"h": values["h"], "h_loop": values["h_loop"], "state": state}


def stage_of(config, pp_rank: int, pp_size: int) -> Tuple[int, int]:
    n = config.parsed_layout.n_compute
    return stage_bounds(n, pp_size, config.pipeline_stage_layers)[pp_rank]


def weight_holders(config, pp_size: int) -> Dict[str, FrozenSet[int]]:
    """Module path (within the block) -> the stages that build it, for every layer and the
    scheme; replicated weights are those with more than one holder."""
    layout = config.parsed_layout
    ops = unrolled_ops(layout)
    holders: Dict[str, set] = {}
    for stage, (start, end) in enumerate(stage_bounds(layout.n_compute, pp_size, config.pipeline_stage_layers)):
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


def connect_replicas(block: nn.Module, config, pp_group) -> None:
    """Give every replicated weight of this stage its holder group, make the copies equal
    (broadcast from the first holder) and mark the non-first copies ``shared``."""
    pp_size, pp_rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    holders = weight_holders(config, pp_size)
    groups = _holder_groups(sorted({h for h in holders.values() if len(h) > 1}, key=sorted), pp_group)
    for path, stages in holders.items():
        if len(stages) < 2 or pp_rank not in stages:
            continue
        module = block.get_submodule(path)
        group = groups[stages]
        first = dist.get_global_rank(pp_group, min(stages))
        index = sorted(stages).index(pp_rank)
        for param in module.parameters():
            with torch.no_grad():
                dist.broadcast(param.data, src=first, group=group)
            setattr(param, HOLDER_GROUP, (group, index))
            if index > 0:
                param.shared = True  # megatron-core leaves it out of the grad norm


def _holder_groups(sets: List[FrozenSet[int]], pp_group) -> Dict[FrozenSet[int], object]:
    """One process group per set of stages, within each pipeline group; every rank creates every
    group in the same order, as torch.distributed requires."""
    own = dist.get_process_group_ranks(pp_group)
    everyone: List[Optional[List[int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, own)
    pipelines = sorted({tuple(ranks) for ranks in everyone})
    mine = {}
    for stages in sets:
        for ranks in pipelines:
            group = dist.new_group([ranks[s] for s in sorted(stages)])
            if tuple(own) == ranks:
                mine[stages] = group
    return mine


def sum_replica_grads(model_chunks: Sequence[nn.Module]) -> None:
    """Sum each replicated weight's gradient over the stages holding it. Runs before megatron's
    data-parallel reduction (sums commute), so it sees every rank's full local gradient."""
    by_group: Dict[object, List[Tensor]] = {}
    for chunk in model_chunks:
        for param in chunk.parameters():
            holder = getattr(param, HOLDER_GROUP, None)
            if holder is not None:
                grad = param.main_grad if hasattr(param, "main_grad") else param.grad
                by_group.setdefault(holder[0], []).append(grad)
    for group, grads in by_group.items():
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)


def holder_index(param: Tensor) -> int:
    holder = getattr(param, HOLDER_GROUP, None)
    return 0 if holder is None else holder[1]
