"""Pipeline parallelism over the unrolled graph.

Stage s runs layer applications [start, end) of ``megatron_mesh.unrolled`` (an even split or
``pipeline_stage_layers``). What crosses a stage boundary is the block's carry, packed along the
hidden dimension into one [s, b, n*h] tensor (megatron-core's schedules exchange its shape
because the model config sets ``variable_seq_lengths``): h and h_emb before the loop; h, h(t),
h_emb, h(0) and, for MeSH, the B buffer slots inside it; h alone after it.

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

from megatron_mesh.mesh import LoopState
from megatron_mesh.unrolled import phase_before, stage_bounds, stage_ops, unrolled_ops

REPLICA = "mesh_replica"
"""Parameter attribute: the ``Replica`` record of a weight held by several ranks."""

TIED_COPY = "mesh_tied_copy"
"""Module attribute: True on a layer (or scheme) computing with an earlier chunk's parameters."""


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
