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

from megatron_mesh.checkpoints import TRACKER, iteration_dir, verify
from megatron_mesh.config import ARCHITECTURE_FIELDS, MeshConfig


def checkpoint_to_load(args) -> Optional[Path]:
    """The checkpoint directory megatron's load_checkpoint will read, or None (fresh start)."""
    for directory in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if directory and (Path(directory) / TRACKER).is_file():
            return iteration_dir(directory, getattr(args, "ckpt_step", None))
    return None


def architecture(model_json: str) -> dict:
    config = MeshConfig(**json.loads(model_json), use_cpu_initialization=True)
    values = {f: getattr(config, f) for f in ARCHITECTURE_FIELDS}
    values["layout"] = str(config.parsed_layout)
    return values


def check_resume_model(args) -> None:
    """Raise ValueError naming each field where the checkpoint's model and the config's differ,
    or when its distributed-optimizer state cannot load at this run's TP/PP."""
    ckpt = checkpoint_to_load(args)
    if ckpt is None:
        return
    # each rank hashes its share of the files: N ranks read the checkpoint once together
    verify(ckpt, "resume from it with `-- --ckpt-step {iteration}`",
           "--set checkpointing.verify=false", share=(args.rank, args.world_size),
           hashes=not args.mesh_skip_checkpoint_verification)
    import warnings

    from megatron.core.dist_checkpointing import load_common_state_dict

    with warnings.catch_warnings():  # reading one small object, not a distributed load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        common = load_common_state_dict(str(ckpt))
    _check_optimizer_layout(args, ckpt, common)
    saved = getattr(common.get("args"), "mesh_model", None)
    if saved is None:
        return  # not written by megatron-mesh: megatron's own checks apply
    ours, theirs = architecture(args.mesh_model), architecture(saved)
    differ = [f"{f}: checkpoint {theirs[f]!r}, config {ours[f]!r}" for f in ARCHITECTURE_FIELDS
              if ours[f] != theirs[f]]
    if differ:
        raise ValueError(f"{ckpt}: the checkpoint's model differs from the config's model section "
                         f"({'; '.join(differ)}); see {ckpt.parent / 'model.yml'} if it was converted")


def _check_optimizer_layout(args, ckpt: Path, common: dict) -> None:
    """megatron's default distributed-optimizer layout (dp_reshardable) loads at another DP size
    but not at another TP/PP, and its error then names a deprecated flag
    (training/checkpointing.py:2250). Say what to do instead."""
    saved = common.get("args")
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if (saved is None or sharding != "dp_reshardable" or args.no_load_optim or args.finetune
            or ckpt.name == "release"):
        return
    then = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size)
    now = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if then != now and args.use_distributed_optimizer:
        raise ValueError(
            f"{ckpt}: its distributed-optimizer state was saved at TP={then[0]}, PP={then[1]} in "
            f"megatron's default layout, which loads at another data-parallel size only, not at "
            f"TP={now[0]}, PP={now[1]}. Resume at TP={then[0]}, PP={then[1]}; or load the weights "
            f"with a fresh optimizer (`-- --no-load-optim`); and save with "
            f"checkpointing.optimizer_reshardable: true to move between layouts later")
