"""Parameter-name mapping between megatron-mesh and Hugging Face: GPT-NeoX and the twin
(``modeling_megatron_mesh``) here, Llama in ``hf/llama.py``.

With parallel residual, 25% rotary and untied embeddings, a megatron-core layer and an HF
``GPTNeoXLayer`` hold the same tensors under different names; no QKV permutation is needed
(both lay out query_key_value per head as [q, k, v]).
"""

from __future__ import annotations

import typing
from typing import Any, Dict, List, Tuple

from torch import Tensor

from megatron_mesh.config.experiment import type_name, type_ok
from megatron_mesh.config.model import HF_NAMES, MeshConfig
from megatron_mesh.errors import CheckpointError
from megatron_mesh.hf import llama
from megatron_mesh.hf.names import under
from megatron_mesh.recurrence.layout import Layout

HF_ACTIVATIONS = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
"""MeshConfig.gelu_approximation -> the HF ``hidden_act`` an export declares (the one field
whose value translates, not just its name); the llama family's (None) is SwiGLU's 'silu'."""
HF_GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}
"""HF ``hidden_act`` -> MeshConfig.gelu_approximation, for the activations GPT-NeoX models use."""

LAYER_NAMES = {  # megatron-core TransformerLayer suffix -> HF GPTNeoXLayer suffix
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "attention.dense.weight",
    "self_attention.linear_proj.bias": "attention.dense.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}


GPT_NEOX_OUTPUT_NAMES = ("embed_out.weight", "lm_head.weight")
"""GPTNeoXForCausalLM's output layer: ``embed_out`` in Pythia's files and transformers 4.x's
module, ``lm_head`` in 5.x's module. 5.x renames ``embed_out`` on load and back on save (seen
with 5.17), so the files either version writes load in both."""


def gpt_neox_output_name(names) -> str:
    """Which of ``GPT_NEOX_OUTPUT_NAMES`` a GPT-NeoX state dict (or model's keys) uses."""
    found = [n for n in GPT_NEOX_OUTPUT_NAMES if n in names]
    if len(found) != 1:
        raise KeyError(f"a GPT-NeoX state dict holds one output layer, {' or '.join(GPT_NEOX_OUTPUT_NAMES)}; "
                       f"this one holds {found or 'neither'}")
    return found[0]


def megatron_layer_prefixes(layout: Layout) -> List[str]:
    """Module paths of the layers that own weights, in execution order of first use."""
    prefixes = [f"decoder.prelude.{i}" for i in range(layout.prelude)]
    for c, num_layers in enumerate(layout.core_modules):
        prefixes += [f"decoder.cores.{c}.{i}" for i in range(num_layers)]
    return prefixes + [f"decoder.coda.{i}" for i in range(layout.coda)]


def gpt_neox_to_megatron(
    hf_state: Dict[str, Tensor], layout: Layout, embedding_scale: float = 1.0
) -> Dict[str, Tensor]:
    """Map a GPTNeoXForCausalLM state dict onto a vanilla MeshGPTModel's names.

    HF GPT-NeoX does not scale its embeddings; a model that multiplies them by
    ``embedding_scale`` gets the HF table divided by it, so both produce the same h_emb.
    """
    if layout.recursive:
        raise CheckpointError(f"layout={layout}: GPT-NeoX checkpoints map onto vanilla layouts only")
    hf_layers = len({k.split(".")[2] for k in hf_state if k.startswith("gpt_neox.layers.")})
    if hf_layers != layout.n_compute:
        raise CheckpointError(
            f"the GPT-NeoX checkpoint has {hf_layers} layers, layout={layout} expects "
            f"{layout.n_compute}"
        )
    names = gpt_neox_name_pairs(layout, gpt_neox_output_name(hf_state))
    out = {ours: hf_state[theirs] for ours, theirs in names}
    out["embedding.word_embeddings.weight"] = out["embedding.word_embeddings.weight"] / embedding_scale
    return out


def gpt_neox_name_pairs(layout: Layout, output_name: str = GPT_NEOX_OUTPUT_NAMES[0]) -> List[Tuple[str, str]]:
    """(megatron-mesh name, GPTNeoXForCausalLM name) for every tensor of a vanilla layout."""
    pairs = [
        ("embedding.word_embeddings.weight", "gpt_neox.embed_in.weight"),
        ("decoder.final_layernorm.weight", "gpt_neox.final_layer_norm.weight"),
        ("decoder.final_layernorm.bias", "gpt_neox.final_layer_norm.bias"),
        ("output_layer.weight", output_name),
    ]
    for i, prefix in enumerate(megatron_layer_prefixes(layout)):
        pairs += [(f"{prefix}.{ours}", f"gpt_neox.layers.{i}.{theirs}") for ours, theirs in LAYER_NAMES.items()]
    return pairs


def gpt_neox_names(state: Dict[str, Tensor], layout: Layout, embedding_scale: float = 1.0,
                   output_name: str = GPT_NEOX_OUTPUT_NAMES[0]) -> Dict[str, Tensor]:
    """A vanilla MeshGPTModel state dict as GPTNeoXForCausalLM names (scale folded into embed_in;
    ``output_name``: the installed transformers' name of the output layer)."""
    out = {theirs: state[ours] for ours, theirs in gpt_neox_name_pairs(layout, output_name)}
    out["gpt_neox.embed_in.weight"] = out["gpt_neox.embed_in.weight"] * embedding_scale
    return out


def _twin_name(name: str) -> str:
    """The ``modeling_megatron_mesh`` name of a MeshGPTModel entry outside the layers."""
    if name == "embedding.word_embeddings.weight":
        return "model.embed_in.weight"
    if name == "output_layer.weight":
        return "embed_out.weight"
    if name.startswith("decoder.final_layernorm."):
        return "model.final_layer_norm." + name.rsplit(".", 1)[1]
    for module in ("scheme", "exit_gate"):  # decoder.exit_gate.gates.0.weight -> model.exit_gate...
        if name.startswith(f"decoder.{module}."):
            return "model." + name[len("decoder."):]
    raise KeyError(f"{name}: not a MeshGPTModel tensor outside its layers")


def _layer_to_hf(layer: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """One layer's tensors (by suffix) under the twin's names, as the layer family lays them out."""
    if config.layer_family == "llama":
        return llama.layer_to_hf(layer, config)
    return {LAYER_NAMES[k]: v for k, v in layer.items() if k in LAYER_NAMES}


def _layer_from_hf(layer: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    if config.layer_family == "llama":
        return llama.layer_from_hf(layer, config)
    names = {hf: ours for ours, hf in LAYER_NAMES.items()}
    return {names[k]: v for k, v in layer.items() if k in names}


def _twin_prefix(prefix: str) -> str:
    return "model." + prefix[len("decoder."):]  # decoder.cores.0.1 -> model.cores.0.1


def megatron_to_hf_mesh(state: Dict[str, Tensor], config: MeshConfig) -> Dict[str, Tensor]:
    """A MeshGPTModel state dict in ``modeling_megatron_mesh`` names (any layout, scheme and
    layer family); a tied output layer is the embedding table under both names."""
    prefixes = megatron_layer_prefixes(config.parsed_layout)
    out = {}
    for prefix in prefixes:
        layer = under(state, prefix + ".")
        out.update({f"{_twin_prefix(prefix)}.{k}": v for k, v in _layer_to_hf(layer, config).items()})
    in_layers = tuple(p + "." for p in prefixes)
    out.update({_twin_name(k): v for k, v in state.items()
                if not k.startswith(in_layers) and not k.endswith("_extra_state")})
    if config.tie_embeddings:
        out["embed_out.weight"] = out["model.embed_in.weight"]
    return out


def hf_mesh_to_megatron(hf_state: Dict[str, Tensor], names: List[str],
                        config: MeshConfig) -> Dict[str, Tensor]:
    """The inverse: ``names`` are the MeshGPTModel entries wanted (its state-dict keys)."""
    prefixes = megatron_layer_prefixes(config.parsed_layout)
    out: Dict[str, Tensor] = {}
    for prefix in prefixes:
        twin = _twin_prefix(prefix) + "."
        layer = under(hf_state, twin)
        try:
            out.update({f"{prefix}.{k}": v for k, v in _layer_from_hf(layer, config).items()})
        except KeyError as err:
            raise KeyError(f"the Hugging Face weights lack {twin}{err.args[0]}") from None
    for name in names:
        if name not in out and _twin_name(name) in hf_state:
            out[name] = hf_state[_twin_name(name)]
    missing = [n for n in names if n not in out]
    if missing:
        raise KeyError(f"the Hugging Face weights lack the tensors of {missing[:5]} ({len(missing)} in all)")
    return {n: out[n] for n in names}


def hf_mesh_config_kwargs(config: MeshConfig) -> Dict[str, object]:
    """``MegatronMeshConfig`` arguments for a ``MeshConfig``: every field of ``HF_NAMES`` under
    its Hugging Face name (the activation as the HF name of the one the model used)."""
    kwargs = {hf: getattr(config, name) for name, hf in HF_NAMES.items()}
    kwargs[HF_NAMES["gelu_approximation"]] = HF_ACTIVATIONS.get(config.gelu_approximation, "silu")
    return kwargs


def hf_activation(act: Any) -> str:
    """The gelu_approximation of an HF ``hidden_act``; CheckpointError for another activation."""
    if act not in HF_GELU:
        raise CheckpointError(f"config.json: hidden_act={act!r}: expected one of {sorted(HF_GELU)}")
    return HF_GELU[act]


def hf_mesh_section(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """The inverse of ``hf_mesh_config_kwargs``: the model section of a megatron_mesh
    config.json, each ``HF_NAMES`` field read back from its HF name and type-checked. A name the
    file lacks (an export from before the field existed) leaves the MeshConfig default."""
    hints = typing.get_type_hints(MeshConfig)
    section: Dict[str, Any] = {}
    for name, hf in HF_NAMES.items():
        if hf not in hf_config:
            continue
        value = hf_config[hf]
        if name == "gelu_approximation":
            if value == "silu" and hf_config.get("layer_family") == "llama":
                continue  # SwiGLU: the llama family has no GELU to choose
            value = hf_activation(value)
        elif not type_ok(value, hints[name]):
            raise CheckpointError(f"config.json: {hf}={value!r}: expected {type_name(hints[name])}, "
                                  f"got {type(value).__name__}")
        section[name] = value
    return section
