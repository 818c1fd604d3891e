"""Megatron torch_dist checkpoint -> Hugging Face directory, on one CPU process (the checkpoint
read, verified and checked by megatron_mesh.checkpoint.reader)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megatron_mesh.checkpoint.reader import (check_finite, check_shapes, load_checkpoint,
                                             saved_model_config)
from megatron_mesh.errors import CheckpointError
from megatron_mesh.config.model import MeshConfig
from megatron_mesh.data.tokenizer import MODEL_INPUT_NAMES, TokenizerSpecError, hf_tokenizer, tokenizer_source
from megatron_mesh.fs import OutputExistsError, atomic_directory, check_writable
from megatron_mesh.hf import llama
from megatron_mesh.hf.mapping import (gpt_neox_names, gpt_neox_output_name, hf_mesh_config_kwargs,
                                      megatron_to_hf_mesh)

__all__ = ["CheckpointError", "OutputExistsError", "export"]


def build_hf_model(state: Dict[str, torch.Tensor], config: MeshConfig):
    """A plain transformers model for a vanilla layout (GPTNeoXForCausalLM, LlamaForCausalLM or
    Qwen2ForCausalLM, sqrt(d) folded into the embeddings), else the megatron-mesh remote-code
    model; both in fp32 with the trained activation declared."""
    if config.state_scheme == "vanilla" and config.layer_family == "gpt_neox":
        return _gpt_neox_model(state, config)
    if config.state_scheme == "vanilla" and llama.plain_export_problem(config) is None:
        return _llama_model(state, config)
    return _twin_model(state, config)


def _gpt_neox_model(state: Dict[str, torch.Tensor], config: MeshConfig):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kwargs = hf_mesh_config_kwargs(config)
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
    output = gpt_neox_output_name(model.state_dict())
    model.load_state_dict(gpt_neox_names(state, config.parsed_layout, scale, output), strict=True)
    return model


def _llama_model(state: Dict[str, torch.Tensor], config: MeshConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama.hf_config(config))
    model.load_state_dict(llama.to_hf_state(state, config), strict=True)
    return model


def _twin_model(state: Dict[str, torch.Tensor], config: MeshConfig):
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

    model = MegatronMeshForCausalLM(MegatronMeshConfig(**hf_mesh_config_kwargs(config)))
    model.load_state_dict(megatron_to_hf_mesh(state, config), strict=True)
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
            f"- layers: {config.layer_family}, activation: {_activation(config)}\n")


def _activation(config: MeshConfig) -> str:
    return {"tanh": "GELU (tanh)", "none": "GELU (erf)"}.get(config.gelu_approximation, "SwiGLU")


def export(checkpoint: str, output: str, *, dtype: str = "fp32", tokenizer: Optional[str] = None,
           iteration: Optional[int] = None, force: bool = False, verify_hashes: bool = True,
           allow_non_finite: bool = False) -> Path:
    """The Megatron checkpoint ``checkpoint`` (its tracked or given ``iteration``) as a Hugging
    Face directory ``output``, in ``dtype`` (fp32 or bf16), with its (or the given) tokenizer."""
    check_writable(Path(output), force)
    if tokenizer:
        tokenizer_source(tokenizer, "--tokenizer")  # before the (slow) read
    state, common = load_checkpoint(checkpoint, iteration, verify_hashes)
    if not allow_non_finite:
        check_finite(state, checkpoint)
    config = saved_model_config(common["args"])
    check_shapes(state, config)
    tok, what = (tokenizer, "--tokenizer") if tokenizer else trained_tokenizer(checkpoint, common["args"])
    model = build_hf_model(state, config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    with atomic_directory(output, force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
        if tok:
            save_tokenizer(tok, tmp, what)
        (tmp / "README.md").write_text(model_card(config, common))
    return Path(output)


def trained_tokenizer(checkpoint: str, args) -> Tuple[Optional[str], str]:
    """The Hugging Face tokenizer a checkpoint's run trained with (None for e.g. NullTokenizer),
    checked by the tokenizer rule, and how errors name it."""
    spec, what = getattr(args, "tokenizer_model", None), "the checkpoint's tokenizer.model"
    if not spec or getattr(args, "tokenizer_type", None) not in (None, "HuggingFaceTokenizer"):
        return None, what
    try:
        tokenizer_source(spec, what)
    except TokenizerSpecError as err:
        raise TokenizerSpecError(f"{checkpoint}: {err}; pass --tokenizer to export with one found "
                                 f"here") from None
    return spec, what


def save_tokenizer(spec: str, out: Path, what: str = "tokenizer") -> None:
    """``spec``'s tokenizer (megatron_mesh.data.tokenizer's rule) beside an export. Its config
    names its class (AutoTokenizer needs it for custom model types) and GPT-NeoX's input names:
    the exported models take no token_type_ids, as HF's GPTNeoX, and `generate(**tok(text))`
    refuses the ones a plain PreTrainedTokenizerFast returns."""
    hf_tokenizer(spec, what).save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    data["model_input_names"] = list(MODEL_INPUT_NAMES)
    config_file.write_text(json.dumps(data, indent=2))
