"""Refuse to load a checkpoint whose model differs from the one the config builds.

megatron's own check (checkpointing.check_checkpoint_args) compares num_layers, hidden size and
heads only; a different layout of the same depth, state scheme, embedding scale or activation
would load without error (or fail deep in torch.distributed.checkpoint) and train a different
model than the one that was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_mesh.checkpoints import TRACKER, iteration_dir
from megatron_mesh.config import MeshConfig

# MeshConfig fields that define the function the weights compute
ARCHITECTURE_FIELDS = (
    "layout", "state_scheme", "buffer_slots", "hidden_size", "num_attention_heads",
    "ffn_hidden_size", "vocab_size", "rotary_percent", "rotary_base", "layernorm_epsilon",
    "gelu_approximation", "scale_embeddings",
)


def checkpoint_to_load(args) -> Optional[Path]:
    """The checkpoint directory megatron's load_checkpoint will read, or None (fresh start)."""
    for directory in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if directory and (Path(directory) / TRACKER).is_file():
            return iteration_dir(directory)
    return None


def architecture(model_json: str) -> dict:
    config = MeshConfig(**json.loads(model_json), use_cpu_initialization=True)
    values = {f: getattr(config, f) for f in ARCHITECTURE_FIELDS}
    values["layout"] = str(config.parsed_layout)
    return values


def check_resume_model(args) -> None:
    """Raise ValueError naming each field where the checkpoint's model and the config's differ."""
    ckpt = checkpoint_to_load(args)
    if ckpt is None:
        return
    import warnings

    from megatron.core.dist_checkpointing import load_common_state_dict

    with warnings.catch_warnings():  # reading one small object, not a distributed load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        saved = getattr(load_common_state_dict(str(ckpt)).get("args"), "mesh_model", None)
    if saved is None:
        return  # not written by megatron-mesh: megatron's own checks apply
    ours, theirs = architecture(args.mesh_model), architecture(saved)
    differ = [f"{f}: checkpoint {theirs[f]!r}, config {ours[f]!r}" for f in ARCHITECTURE_FIELDS
              if ours[f] != theirs[f]]
    if differ:
        raise ValueError(f"{ckpt}: the checkpoint's model differs from the config's model section "
                         f"({'; '.join(differ)}); see {ckpt.parent / 'model.yml'} if it was converted")
