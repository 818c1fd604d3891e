"""Setting up torch.distributed and megatron-core's model-parallel state."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed


def initialize_single_process(seed: int = 1234) -> None:
    """A world of one process (TP = PP = DP = 1) for tools and tests; idempotent.

    megatron-core's layers read their process groups from ``parallel_state`` even when nothing
    is parallel, so building a model needs this first.
    """
    if not dist.is_initialized():
        # an in-process store: no port to pick, nothing to collide with other processes
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
