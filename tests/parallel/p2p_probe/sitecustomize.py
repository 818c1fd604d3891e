"""Put on PYTHONPATH of a trainer run by tests/parallel/test_parity.py: counts, per rank, the
pipeline tensors megatron-core sends and the shape handshakes (its _communicate_shapes sends
3-element int64 shape tensors with batch_isend_irecv before the tensors when shapes are
variable), and prints both at exit."""

import atexit
import os

if "RANK" in os.environ:  # a torchrun worker, not the launcher
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    counts = {"sends": 0, "shape handshakes": 0}

    def is_shape(tensor) -> bool:
        return tensor.dtype == torch.int64 and tuple(tensor.shape) == (3,)

    def counting_batch(original):
        def batch_isend_irecv(ops):
            counts["shape handshakes"] += bool(ops) and all(is_shape(op.tensor) for op in ops)
            return original(ops)
        return batch_isend_irecv

    def counting_isend(original):
        def isend(tensor, *args, **kwargs):
            counts["sends"] += not is_shape(tensor)
            return original(tensor, *args, **kwargs)
        return isend

    dist.batch_isend_irecv = counting_batch(dist.batch_isend_irecv)
    # P2POp checks its op against distributed_c10d.isend: replace both names
    dist.isend = distributed_c10d.isend = counting_isend(distributed_c10d.isend)

    def report():
        if dist.is_initialized():  # a trainer rank (not e.g. the checkpoint writer it spawns)
            print(f"[p2p-probe] rank {os.environ['RANK']}: "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)

    atexit.register(report)
