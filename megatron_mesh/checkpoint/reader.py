"""Reading a Megatron torch_dist checkpoint on one process: the one reader that export,
conversion, evaluation and probing share.

torch_dist checkpoints store every tensor whole (whatever TP/PP layout saved them), so one
process reads the model tensors it needs through ``torch.distributed.checkpoint`` without a
process group, and never the optimizer state. The directory is found and verified first
(megatron_mesh.checkpoint.paths); ``check_shapes`` is the one name/shape check of weights against the
model a config builds, ``check_finite`` the one NaN/Inf check.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron_mesh.checkpoint.paths import iteration_dir, verify
from megatron_mesh.errors import CheckpointError, ConfigError
from megatron_mesh.config.model import MeshConfig

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
COMMON_STATE = "common_state/shard_0_1"

# megatron-core checkpoints name the layer norms as TransformerEngine fuses them, whichever
# spec saved them (TransformerLayer's sharded_state_dict_keys_map, set by
# gpt_layer_specs.get_gpt_layer_local_submodules); module state dicts of the local spec use
# the norm modules' own names.
CHECKPOINT_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def module_names(checkpoint_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Checkpoint keys (TE norm names) -> local-spec module state-dict names."""
    out = {}
    for key, tensor in checkpoint_state.items():
        for fused, own in CHECKPOINT_NORM_NAMES.items():
            key = key.replace(f".{fused}", f".{own}")
        out[key] = tensor
    return out


def load_checkpoint(path: str, iteration: Optional[int] = None,
                    verify_hashes: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Model tensors (under the local spec's module names, whichever spec saved them) and the
    saved common state (args, iteration) of a torch_dist checkpoint, verified against its
    integrity manifest first (``verify_hashes=False``: file sizes only)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_mesh.checkpoint import unpickle

    ckpt = iteration_dir(path, iteration)
    verify(ckpt, "read {path} instead", "pass --no-verify", hashes=verify_hashes)
    reader = unpickle.Reader(str(ckpt))  # pickles by the allowlist (its docstring)
    metadata = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}
    if COMMON_STATE not in metadata.state_dict_metadata:
        raise CheckpointError(f"{ckpt}: no Megatron common state (args) in the checkpoint")
    state[COMMON_STATE] = None
    with warnings.catch_warnings():  # one process without torch.distributed is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        with unpickle.refusals_unwrapped():
            load(state, storage_reader=reader, planner=unpickle.Planner(), no_dist=True)
    common = state.pop(COMMON_STATE)[0]
    return module_names(state), common


def saved_model_config(args) -> MeshConfig:
    """The MeshConfig a megatron-mesh run saved (its --mesh-model JSON + precision-free fields):
    the one reader of a checkpoint's model, for everything that loads one."""
    model = getattr(args, "mesh_model", None)
    if not model:
        raise CheckpointError("the checkpoint was not written by tools/pretrain_mesh.py (no mesh_model arg)")
    try:
        return MeshConfig.from_json(model, perform_initialization=False, use_cpu_initialization=True)
    except ConfigError as err:
        raise CheckpointError(f"the checkpoint's saved model section: {err}") from None


def parameter_shapes(config: MeshConfig) -> Dict[str, torch.Size]:
    """Name -> shape of every tensor the model ``config`` builds (on the meta device, no memory)."""
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec
    from megatron_mesh.parallel.process_groups import initialize_single_process

    initialize_single_process()
    with torch.device("meta"):
        model = MeshGPTModel(config, spec=local_block_spec())
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def check_shapes(state: Dict[str, torch.Tensor], config: MeshConfig, source: str = "checkpoint",
                 fresh_prefixes: Tuple[str, ...] = ()) -> None:
    """The tensors of ``state`` (read from ``source``) are exactly those of the model ``config``
    builds, name for name and shape for shape; only names under ``fresh_prefixes`` (parameters a
    conversion initializes) may be missing."""
    expected = parameter_shapes(config)
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(fresh_prefixes))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source} and config disagree: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{name}: {source} shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[name])}")


def check_finite(state: Dict[str, torch.Tensor], checkpoint: str) -> None:
    """CheckpointError naming the tensors holding NaN/Inf: an export of them is no model."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        listed = ", ".join(f"{name} ({count:,} values)" for name, count in sorted(bad.items())[:5])
        raise CheckpointError(
            f"{checkpoint}: {len(bad)} weight tensors hold NaN/Inf: {listed}"
            f"{', ...' if len(bad) > 5 else ''}. Export an earlier iteration (--iteration N), or "
            f"pass --allow-non-finite to write these values anyway")


def build_model(config: MeshConfig, state: Dict[str, Tensor], fresh_prefixes: Tuple[str, ...] = (),
                seed: int = 1234):
    """A MeshGPTModel of ``config`` holding ``state``; only names under ``fresh_prefixes`` may be
    left at init."""
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec
    from megatron_mesh.parallel.process_groups import initialize_single_process

    if not config.use_cpu_initialization:
        raise ValueError("build_model builds on the CPU (the caller moves the model): expected a "
                         "config with use_cpu_initialization=True")
    check_shapes(state, config, "weights", fresh_prefixes)  # on the meta device, before seeding
    initialize_single_process(seed)
    torch.manual_seed(seed)
    model = MeshGPTModel(config, spec=local_block_spec())
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model
