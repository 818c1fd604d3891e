"""One tensor-parallel rank of tests/parallel/test_tensor_parallel.py (run under torchrun).

Builds the model at TP = world size (optionally with sequence parallelism), loads the shared
release checkpoint through megatron-core's dist_checkpointing (resharding it), runs forward and
backward on a fixed batch, reduces the sequence-parallel gradients the way the trainer does
(finalize_model_grads.py), and saves this rank's gradients with their TP layout.

    torchrun --nproc-per-node 2 tp_worker.py CHECKPOINT OUT_DIR SCHEME [--sequence-parallel]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron_mesh  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(checkpoint, out_dir, scheme, sequence_parallel):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from batch import fixed_batch, tiny_section
    from megatron_mesh.config import MeshConfig
    from megatron_mesh.layers import local_block_spec
    from megatron_mesh.model import MeshGPTModel

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(1)
    config = MeshConfig(**tiny_section(scheme), tensor_model_parallel_size=tp,
                        sequence_parallel=sequence_parallel, use_cpu_initialization=True)
    model = MeshGPTModel(config, spec=local_block_spec())
    dist_checkpointing.load(model.sharded_state_dict(), checkpoint)
    tokens, positions = fixed_batch(config)
    loss = model(tokens, positions, labels=tokens).sum()
    loss.backward()
    model.ddp_config = DistributedDataParallelConfig()  # what the trainer's DDP wrapper carries
    _allreduce_non_tensor_model_parallel_grads([model], config, parallel_state.get_tensor_model_parallel_group())
    grads = {name: (p.grad, bool(getattr(p, "tensor_model_parallel", False)),
                    getattr(p, "partition_dim", -1)) for name, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--sequence-parallel" in sys.argv)
