"""One tensor-parallel rank of tests/parallel/test_tensor_parallel.py (run under torchrun).

Builds the model at TP = world size (optionally with sequence parallelism), loads the shared
release checkpoint through megatron-core's dist_checkpointing (resharding it), runs forward and
backward on a fixed batch, reduces the sequence-parallel gradients the way the trainer does
(finalize_model_grads.py), and saves this rank's gradients with their TP layout.

With ``--dropout-masks`` it instead runs one training-mode forward pass at hidden dropout 0.5
(unfused, so every mask goes through ``torch.nn.functional.dropout``) and saves which elements
each dropout call zeroed on this rank.

    torchrun --nproc-per-node 2 tp_worker.py CHECKPOINT OUT_DIR SCHEME [--sequence-parallel]
        [--dropout-masks]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import megatron_mesh  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def recorded_dropout_masks(model, tokens, positions):
    """[dropped elements of each torch.nn.functional.dropout call with p > 0] of one forward."""
    masks, dropout = [], torch.nn.functional.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        out = dropout(x, p, training, inplace)
        if p > 0 and training:
            masks.append(out == 0)  # kept elements are x / (1 - p), nonzero for nonzero x
        return out

    torch.nn.functional.dropout = recording
    try:
        model.train()
        model(tokens, positions)
    finally:
        torch.nn.functional.dropout = dropout
    return masks


def main(checkpoint, out_dir, scheme, sequence_parallel, dropout_masks=False):
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from batch import fixed_batch, tiny_section
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec

    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    parallel_state.initialize_model_parallel(tp, 1)
    model_parallel_cuda_manual_seed(1)
    dropout = {"hidden_dropout": 0.5, "bias_dropout_fusion": False} if dropout_masks else {}
    config = MeshConfig(**tiny_section(scheme), tensor_model_parallel_size=tp,
                        sequence_parallel=sequence_parallel, use_cpu_initialization=True, **dropout)
    model = MeshGPTModel(config, spec=local_block_spec())
    dist_checkpointing.load(model.sharded_state_dict(), checkpoint)
    tokens, positions = fixed_batch(config)
    if dropout_masks:
        masks = recorded_dropout_masks(model, tokens, positions)
        torch.save(masks, Path(out_dir) / f"masks{dist.get_rank()}.pt")
        return dist.destroy_process_group()
    loss = model(tokens, positions, labels=tokens).sum()
    loss.backward()
    model.ddp_config = DistributedDataParallelConfig()  # what the trainer's DDP wrapper carries
    _allreduce_non_tensor_model_parallel_grads([model], config, parallel_state.get_tensor_model_parallel_group())
    grads = {name: (p.grad, bool(getattr(p, "tensor_model_parallel", False)),
                    getattr(p, "partition_dim", -1)) for name, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--sequence-parallel" in sys.argv,
         "--dropout-masks" in sys.argv)
