"""Writing a Megatron release checkpoint from an in-process model: what conversions and tests
start training from (``tools/pretrain_mesh.py`` loads its weights, then starts at iteration 0)."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Optional

from megatron_mesh.checkpoint import manifest
from megatron_mesh.config.model import MeshConfig
from megatron_mesh.fs import atomic_directory


def checkpoint_args(config: MeshConfig, tokenizer: Optional[str]) -> Namespace:
    """The 'args' a Megatron checkpoint carries: what check_checkpoint_args compares, what
    tools/convert.py megatron-to-hf reads back, and the model section in the trainer's format
    (``MeshConfig.to_json``)."""
    return Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, add_position_embedding=True,
        max_position_embeddings=config.max_sequence_length, padded_vocab_size=config.vocab_size,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, world_size=1,
        data_parallel_size=1, ckpt_format="torch_dist", consumed_train_samples=0, seq_length=0,
        tokenizer_type="HuggingFaceTokenizer" if tokenizer else None, tokenizer_model=tokenizer,
        mesh_model=config.to_json(),
    )


def save_release_checkpoint(model, args: Namespace, output, force: bool = False) -> Path:
    """``output/release`` + the tracker file, written the way megatron.training saves."""
    from megatron.core import dist_checkpointing

    out = Path(output)
    with atomic_directory(out, force) as tmp:
        state = {"args": args, "checkpoint_version": 3.0, "iteration": 0,
                 "model": model.sharded_state_dict()}
        (tmp / "release").mkdir()
        dist_checkpointing.save(state, str(tmp / "release"))
        manifest.write(tmp / "release", rank=0, world_size=1)  # one process wrote it all
        (tmp / "latest_checkpointed_iteration.txt").write_text("release")
        (tmp / "model.yml").write_text(_model_yaml(MeshConfig.from_json(args.mesh_model).model_section()))
    return out


def _model_yaml(section: dict) -> str:
    import yaml

    return ("# The model section of this checkpoint: train with the same one (extends: or copy).\n"
            + yaml.safe_dump({"model": section}, sort_keys=False))
