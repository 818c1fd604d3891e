"""Megatron torch_dist checkpoint -> Hugging Face directory, on one CPU process.

torch_dist checkpoints store every tensor whole (whatever TP layout saved them), so one process
reads the model tensors it needs through ``torch.distributed.checkpoint`` without a process
group, and never the optimizer state.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megatron_mesh.checkpoints import CheckpointError, iteration_dir, verify
from megatron_mesh.config import MeshConfig
from megatron_mesh.fs import OutputExistsError, atomic_directory, check_writable
from megatron_mesh.hf.mapping import module_names

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
COMMON_STATE = "common_state/shard_0_1"


__all__ = ["CheckpointError", "OutputExistsError", "export", "load_checkpoint"]


def load_checkpoint(path: str, iteration: Optional[int] = None,
                    verify_hashes: bool = True) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Model tensors (under the local spec's module names, whichever spec saved them) and the
    saved common state (args, iteration) of a torch_dist checkpoint, verified against its
    integrity manifest first (``verify_hashes=False``: file sizes only)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = iteration_dir(path, iteration)
    verify(ckpt, "read {path} instead", "pass --no-verify", hashes=verify_hashes)
    reader = FileSystemReader(str(ckpt))
    metadata = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and k.startswith(MODEL_PREFIXES)}
    if COMMON_STATE not in metadata.state_dict_metadata:
        raise CheckpointError(f"{ckpt}: no Megatron common state (args) in the checkpoint")
    state[COMMON_STATE] = None
    with warnings.catch_warnings():  # one process without torch.distributed is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, storage_reader=reader, no_dist=True)
    common = state.pop(COMMON_STATE)[0]
    return module_names(state), common


def mesh_config_from_args(args) -> MeshConfig:
    """The MeshConfig a megatron-mesh run saved (its --mesh-model JSON + precision-free fields)."""
    model = getattr(args, "mesh_model", None)
    if not model:
        raise CheckpointError("the checkpoint was not written by tools/pretrain_mesh.py (no mesh_model arg)")
    return MeshConfig(**json.loads(model), perform_initialization=False, use_cpu_initialization=True)


def parameter_shapes(config: MeshConfig) -> Dict[str, torch.Size]:
    """Name -> shape of every tensor the model ``config`` builds (on the meta device, no memory)."""
    from megatron_mesh.layers import local_block_spec
    from megatron_mesh.model import MeshGPTModel
    from megatron_mesh.parallel.process_groups import initialize_single_process

    initialize_single_process()
    with torch.device("meta"):
        model = MeshGPTModel(config, spec=local_block_spec())
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def check_shapes(state: Dict[str, torch.Tensor], config: MeshConfig) -> None:
    """The checkpoint's tensors are exactly those of the model its config builds."""
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"checkpoint and config disagree: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(state[name].shape)}, config expects {tuple(shape)}")


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


def build_hf_model(state: Dict[str, torch.Tensor], config: MeshConfig):
    """GPTNeoXForCausalLM for vanilla layouts (sqrt(d) folded into embed_in), else the
    megatron-mesh remote-code model; both in fp32 with the trained activation declared."""
    from megatron_mesh.hf.mapping import gpt_neox_names, hf_mesh_config_kwargs, megatron_to_hf_mesh

    kwargs = hf_mesh_config_kwargs(config)
    if config.state_scheme == "vanilla":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        hf_config = GPTNeoXConfig(
            vocab_size=kwargs["vocab_size"], hidden_size=kwargs["hidden_size"],
            num_hidden_layers=config.num_layers, num_attention_heads=kwargs["num_attention_heads"],
            intermediate_size=kwargs["intermediate_size"], hidden_act=kwargs["hidden_act"],
            rotary_pct=kwargs["rotary_pct"], rotary_emb_base=kwargs["rotary_emb_base"],
            max_position_embeddings=kwargs["max_position_embeddings"],
            layer_norm_eps=kwargs["layer_norm_eps"], use_parallel_residual=True,
            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        model = GPTNeoXForCausalLM(hf_config)
        scale = math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
        model.load_state_dict(gpt_neox_names(state, config.parsed_layout, scale), strict=True)
        return model
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

    model = MegatronMeshForCausalLM(MegatronMeshConfig(**kwargs))
    model.load_state_dict(megatron_to_hf_mesh(state), strict=True)
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    return model


def model_card(config: MeshConfig, common: dict) -> str:
    args = common.get("args")
    tokens = getattr(args, "consumed_train_samples", 0) * getattr(args, "seq_length", 0)
    return (f"# megatron-mesh export\n\n- layout: `{config.parsed_layout}` (N_compute {config.num_layers})\n"
            f"- state scheme: `{config.state_scheme}`"
            + (f" (B = {config.buffer_slots})" if config.state_scheme == "mesh" else "") + "\n"
            f"- hidden {config.hidden_size}, heads {config.num_attention_heads}, vocab {config.vocab_size}\n"
            f"- iteration {common.get('iteration')}, training tokens {tokens:,}\n"
            f"- activation: {'GELU (tanh)' if config.gelu_approximation == 'tanh' else 'GELU (erf)'}\n")


def export(checkpoint: str, output: str, dtype: str = "fp32", tokenizer: Optional[str] = None,
           iteration: Optional[int] = None, force: bool = False, verify_hashes: bool = True,
           allow_non_finite: bool = False) -> Path:
    check_writable(Path(output), force)
    state, common = load_checkpoint(checkpoint, iteration, verify_hashes)
    if not allow_non_finite:
        check_finite(state, checkpoint)
    config = mesh_config_from_args(common["args"])
    check_shapes(state, config)
    model = build_hf_model(state, config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    with atomic_directory(output, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        tok = tokenizer or getattr(common["args"], "tokenizer_model", None)
        if tok:
            save_tokenizer(tok, tmp)
        (tmp / "README.md").write_text(model_card(config, common))
    return Path(output)


def save_tokenizer(spec: str, out: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(spec)
    tok = (PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")
           if path.is_file() else AutoTokenizer.from_pretrained(spec))
    tok.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # needed for custom model types
    config_file.write_text(json.dumps(data, indent=2))
