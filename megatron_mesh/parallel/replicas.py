"""Weights several pipeline stages hold (the looped core, the state scheme) kept as one weight.

Within a rank the chunks (virtual pipelining) share one parameter. Across ranks the copies are
replicas: the same at initialisation (broadcast from the rank of the first stage using them),
their gradients summed over the ranks holding them before megatron-core's data-parallel
reduction, counted once in the grad norm (``param.shared`` on the other ranks) and saved once
(``mark_replica_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron_mesh.parallel.stages import weight_holders

REPLICA = "mesh_replica"
"""Parameter attribute: the ``Replica`` record of a weight held by several ranks."""

TIED_COPY = "mesh_tied_copy"
"""Module attribute: True on a layer (or scheme) computing with an earlier chunk's parameters."""


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


def mark_replica_ids(part: dict, module: nn.Module) -> None:
    """In a module's sharded state dict ``part``: a later pipeline stage's copy of a replicated
    weight is not the main replica (megatron-core saves replica 0 of each tensor only)."""
    first = next(module.parameters(), None)
    copy = replica_index(first) if first is not None else 0
    if copy:
        for item in part.values():
            item.replica_id = (copy, *item.replica_id[1:])
