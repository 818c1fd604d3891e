"""The llama layer family <-> Hugging Face Llama (and Qwen2): configs and parameter names.

megatron-core fuses what HF Llama keeps apart, in its own order:
- ``linear_qkv``: per query group ``g`` the group's ``heads / groups`` query heads, then its key
  head, then its value head: [groups, heads / groups + 2, head_dim, hidden] (q_proj, k_proj and
  v_proj of HF stack heads in order, so head i of q_proj is query r of group i // r);
- ``linear_fc1`` of the SwiGLU MLP: [gate_proj; up_proj] (megatron's swiglu takes silu of the
  first half times the second).
Everything else is one tensor under another name. Qwen2 is Llama with q/k/v biases
(``add_qkv_bias``), which fuse as the weights do.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from megatron_mesh.config.model import MeshConfig
from megatron_mesh.errors import CheckpointError
from megatron_mesh.hf.names import under

LAYER_NAMES = {  # megatron-core TransformerLayer suffix -> HF LlamaDecoderLayer suffix
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")

ROPE_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
"""HF ``rope_scaling`` of MeshConfig.rope_scaling_factor, less its ``factor`` (megatron-core's
RotaryEmbedding has these fixed)."""
MODEL_TYPES = ("llama", "qwen2")


def _heads(config: MeshConfig) -> Tuple[int, int, int]:
    return config.num_attention_heads, config.num_query_groups, config.kv_channels


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, config: MeshConfig) -> Tensor:
    """q_proj [heads*d, h], k_proj and v_proj [groups*d, h] (or their biases) -> linear_qkv."""
    heads, groups, d = _heads(config)
    per_group = [t.reshape(groups, -1, d, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(qkv: Tensor, config: MeshConfig) -> Tuple[Tensor, Tensor, Tensor]:
    """linear_qkv -> q_proj, k_proj, v_proj (weights or biases)."""
    heads, groups, d = _heads(config)
    r = heads // groups
    grouped = qkv.reshape(groups, r + 2, d, *qkv.shape[1:])
    q, k, v = grouped[:, :r], grouped[:, r:r + 1], grouped[:, r + 1:]
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


def layer_to_hf(layer: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """One megatron-core layer's tensors (by suffix) as an HF LlamaDecoderLayer's."""
    out = {LAYER_NAMES[k]: v for k, v in layer.items() if k in LAYER_NAMES}
    for kind in ("weight", "bias"):
        fused = layer.get(f"self_attention.linear_qkv.{kind}")
        if fused is not None:
            out.update(zip((f"{p}.{kind}" for p in QKV), split_qkv(fused, config)))
    gate, up = layer["mlp.linear_fc1.weight"].chunk(2, dim=0)
    out.update(zip(FC1, (gate.contiguous(), up.contiguous())))
    return out


def layer_from_hf(layer: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """The inverse of ``layer_to_hf``: an HF LlamaDecoderLayer's tensors as megatron-core's."""
    names = {hf: ours for ours, hf in LAYER_NAMES.items()}
    out = {names[k]: v for k, v in layer.items() if k in names}
    for kind in ("weight", "bias"):
        if f"{QKV[0]}.{kind}" in layer:
            out[f"self_attention.linear_qkv.{kind}"] = fuse_qkv(
                *(layer[f"{p}.{kind}"] for p in QKV), config)
    out["mlp.linear_fc1.weight"] = torch.cat([layer[name] for name in FC1], dim=0)
    return out


def rope_scaling(config: MeshConfig) -> Optional[Dict[str, Any]]:
    """The HF ``rope_scaling`` of a MeshConfig (None: unscaled)."""
    if config.rope_scaling_factor is None:
        return None
    return {**ROPE_SCALING, "factor": float(config.rope_scaling_factor)}


def _rope(hf: Dict[str, Any]) -> Tuple[float, Optional[float]]:
    """(rope_theta, rope_scaling factor or None) of a config.json: transformers 4.x writes
    ``rope_theta`` and ``rope_scaling``, 5.x one ``rope_parameters`` holding both."""
    params = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}),
                                           "rope_theta": hf.get("rope_theta", 10000.0)}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return params["rope_theta"], None
    scaling = {k: params.get(k) for k in ROPE_SCALING}
    if scaling != ROPE_SCALING:
        raise CheckpointError(f"config.json: rope scaling {params}: megatron-mesh supports none or "
                              f"{ROPE_SCALING} with any factor")
    return params["rope_theta"], params["factor"]


def section_from_hf(hf: Dict[str, Any], required) -> Dict[str, Any]:
    """The model section of an HF Llama or Qwen2 config.json (``required(hf, key)`` reads a key
    the model cannot do without)."""
    kind = hf["model_type"]
    unsupported = {"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1,
                   "use_sliding_window": False}
    if kind == "llama":
        unsupported["attention_bias"] = False  # Llama's bias would sit on o_proj too
    for key, want in unsupported.items():
        if hf.get(key, want) != want:
            raise CheckpointError(f"config.json: {key}={hf[key]!r}: megatron-mesh supports {want!r}")
    hidden, heads = required(hf, "hidden_size"), required(hf, "num_attention_heads")
    theta, factor = _rope(hf)
    section = dict(
        layout=str(required(hf, "num_hidden_layers")), state_scheme="vanilla", layer_family="llama",
        scale_embeddings=False, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=required(hf, "intermediate_size"), vocab_size=required(hf, "vocab_size"),
        max_sequence_length=required(hf, "max_position_embeddings"),
        rotary_base=float(theta), rope_scaling_factor=factor,
        layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), init_method_std=hf.get("initializer_range", 0.02),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), add_qkv_bias=kind == "qwen2")
    if hf.get("head_dim") not in (None, hidden // heads):
        section["kv_channels"] = hf["head_dim"]
    return section


def hf_config(config: MeshConfig):
    """The transformers ``LlamaConfig`` (``Qwen2Config`` with q/k/v biases) of a vanilla llama
    MeshConfig; its argument names are the same in transformers 4.x and 5.x."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_query_groups,
        max_position_embeddings=config.max_sequence_length, rms_norm_eps=config.layernorm_epsilon,
        rope_theta=float(config.rotary_base), rope_scaling=rope_scaling(config),
        tie_word_embeddings=config.tie_embeddings, initializer_range=config.init_method_std,
        hidden_act="silu", bos_token_id=0, eos_token_id=0)
    if config.add_qkv_bias:
        if config.rope_scaling_factor is not None or config.qk_layernorm:
            raise CheckpointError("a Qwen2 export (add_qkv_bias) has no rope scaling or qk_layernorm")
        return Qwen2Config(**common, use_sliding_window=False)
    return LlamaConfig(**common, head_dim=config.kv_channels, attention_bias=False, mlp_bias=False)


def plain_export_problem(config: MeshConfig) -> Optional[str]:
    """Why a vanilla llama MeshConfig is no transformers Llama or Qwen2 (None: it is one)."""
    if config.qk_layernorm:
        return "qk_layernorm (HF Llama has no q/k norm)"
    if config.rotary_percent != 1.0:
        return f"rotary_percent={config.rotary_percent} (HF Llama rotates whole heads)"
    if config.scale_embeddings and config.tie_embeddings:
        return "scale_embeddings with tie_embeddings (the sqrt(d) factor cannot fold into a shared table)"
    if config.add_qkv_bias and (config.rope_scaling_factor is not None):
        return "add_qkv_bias with rope_scaling_factor (Qwen2 has no Llama-3 rope scaling)"
    return None


def to_hf_state(state: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """A vanilla llama MeshGPTModel state dict as LlamaForCausalLM / Qwen2ForCausalLM names; a
    scale_embeddings model's sqrt(d) factor folded into embed_tokens."""
    scale = config.hidden_size ** 0.5 if config.scale_embeddings else 1.0
    table = state["embedding.word_embeddings.weight"]
    out = {"model.embed_tokens.weight": table * scale,
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "lm_head.weight": table if config.tie_embeddings else state["output_layer.weight"]}
    for i in range(config.num_layers):
        prefix = f"decoder.prelude.{i}."
        layer = under(state, prefix)
        out.update({f"model.layers.{i}.{k}": v for k, v in layer_to_hf(layer, config).items()})
    return out


def from_hf_state(hf_state: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """The inverse of ``to_hf_state`` for an unscaled model (what ``section_from_hf`` makes)."""
    layers = {int(k.split(".")[2]) for k in hf_state if k.startswith("model.layers.")}
    if layers != set(range(config.num_layers)):
        raise CheckpointError(f"the checkpoint has layers {sorted(layers)[:3]}..{max(layers, default=-1)}, "
                              f"layout={config.layout} expects {config.num_layers}")
    out = {"embedding.word_embeddings.weight": hf_state["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf_state["model.norm.weight"]}
    if not config.tie_embeddings:
        out["output_layer.weight"] = hf_state["lm_head.weight"]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        layer = under(hf_state, prefix)
        out.update({f"decoder.prelude.{i}.{k}": v for k, v in layer_from_hf(layer, config).items()})
    return out
