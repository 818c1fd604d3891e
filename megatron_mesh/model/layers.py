"""The layers of the recursive block, for megatron-core: its layer families and their specs.

Two families (MeshConfig.layer_family), both megatron-core's ``TransformerLayer`` submodules:

- ``gpt_neox`` (Pythia): ``x + attn(ln1(x)) + mlp(ln2(x))`` (HF ``use_parallel_residual=True``).
  megatron-core's TransformerLayer is sequential (``mlp`` reads ``x + attn(...)``) and has no
  flag for it, so ``ParallelResidualTransformerLayer`` reorders the same submodules.
- ``llama``: megatron-core's TransformerLayer as it is (sequential residual); the config makes
  its norms RMSNorm and its MLP SwiGLU (MeshConfig._set_layer_family).

Everything else (attention, rotary, linear layers, bias-dropout-add, layernorm recompute) is
megatron-core's, except that the local spec's core attention is
``megatron_mesh.model.attention.SDPAttention`` (torch's fused attention) by default and its
torch norms work under sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.typed_torch import apply_module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_mesh.config.model import refuse_unsupported
from megatron_mesh.model.attention import SDPAttention


class ParallelResidualTransformerLayer(TransformerLayer):
    """A TransformerLayer whose MLP reads ln2(x) of the layer input, not of x + attn.

    Only ``forward`` is reordered. Paths of megatron-core that bypass it and would silently
    compute the sequential residual (TE CUDA-graph capture/replay), or that this forward does
    not reproduce (MLP recompute and chunking, MoE, activation offloading, fused-TP inference),
    are refused at construction.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        unsupported = {
            "cuda_graph_impl": (config.cuda_graph_impl, "none"),
            "mlp_chunks_for_training": (config.mlp_chunks_for_training, 1),
            "num_moe_experts": (config.num_moe_experts, None),
            "fine_grained_activation_offloading": (config.fine_grained_activation_offloading, False),
            "inference_fuse_tp_communication": (config.inference_fuse_tp_communication, False),
            "recompute_modules with 'mlp'": (self.recompute_mlp, False),
        }
        refuse_unsupported(unsupported, "the GPT-NeoX parallel-residual layer")

    def forward(self, hidden_states, *args, **kwargs):
        # [s, b, h] -> [s, b, h]. Attention first, then the MLP: the order the submodules are
        # registered in, which megatron's DDP chains overlap_param_gather's all-gathers by.
        # x + attn(ln1(x)) through megatron's own attention path
        attn_residual, context = self._forward_attention(hidden_states, *args, **kwargs)
        ln2_out = self._forward_pre_mlp_layernorm(hidden_states)
        if isinstance(ln2_out, tuple):  # fused norms that also return the residual
            ln2_out = ln2_out[0]
        mlp_output_with_bias = apply_module(self.mlp)(ln2_out)
        # + mlp(ln2(x)) through megatron's bias-dropout-add (and pre-MLP-norm recompute)
        return self._forward_post_mlp(mlp_output_with_bias, attn_residual), context


def _mark_sequence_parallel(norm: torch.nn.Module, config) -> torch.nn.Module:
    # Under SP each tensor-parallel rank normalises its own tokens, so the weight and bias
    # gradients are per-rank partial sums; flagging them ``sequence_parallel`` makes
    # megatron-core all-reduce them over the TP group (distributed/finalize_model_grads.py),
    # which is what apex's FusedLayerNorm does. megatron-core's torch fallback
    # (transformer/torch_norm.py, WrappedTorchNorm) refuses SP instead, which would leave CPU
    # runs (and every RMSNorm of the local spec) without it.
    refuse_unsupported({
        "layernorm_zero_centered_gamma": (config.layernorm_zero_centered_gamma, False),
        "memory_efficient_layer_norm": (config.memory_efficient_layer_norm, False),
    }, "the torch norms of the local spec")
    for param in norm.parameters():
        setattr(param, "sequence_parallel", config.sequence_parallel)
    return norm


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm that also works under sequence parallelism (``_mark_sequence_parallel``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        refuse_unsupported({"normalization": (config.normalization, "LayerNorm")},
                           "the torch LayerNorm of the local spec")
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, config)


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm (weight only) that also works under sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        refuse_unsupported({"normalization": (config.normalization, "RMSNorm")},
                           "the torch RMSNorm of the local spec")
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, config)


class SequenceParallelNorm:
    """The local spec's norm: ``SequenceParallelLayerNorm`` or ``SequenceParallelRMSNorm`` as
    ``config.normalization`` says (a builder, as megatron-core's WrappedTorchNorm)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = SequenceParallelRMSNorm if config.normalization == "RMSNorm" else SequenceParallelLayerNorm
        return norm(config, hidden_size, eps=eps)


@dataclass
class RecursiveBlockSubmodules:
    """What the recursive block is built from: megatron-core modules, whichever layer family
    (``family_layer_spec`` picks the layer class and the q/k norms from the config)."""

    layer: ModuleSpec
    """Spec of every transformer layer (prelude, core and coda): its submodules."""
    final_layernorm: Union[ModuleSpec, type]
    """Norm after the coda."""
    qk_norm: Optional[type] = None
    """Norm of queries and keys per head where the config sets ``qk_layernorm``."""


LAYER_CLASSES = {"gpt_neox": ParallelResidualTransformerLayer, "llama": TransformerLayer}
"""MeshConfig.layer_family -> its megatron-core TransformerLayer (class)."""


def family_layer_spec(spec: RecursiveBlockSubmodules, config) -> ModuleSpec:
    """The spec of ``config``'s layers: the layer class of its family, q/k norms if it asks."""
    submodules = spec.layer.submodules
    if config.qk_layernorm:
        if spec.qk_norm is None:
            raise ValueError("qk_layernorm=True, but this block spec has no qk_norm")
        attention = submodules.self_attention
        submodules = dataclasses.replace(submodules, self_attention=dataclasses.replace(
            attention, submodules=dataclasses.replace(
                attention.submodules, q_layernorm=spec.qk_norm, k_layernorm=spec.qk_norm)))
    return ModuleSpec(module=LAYER_CLASSES[config.layer_family], submodules=submodules)


CORE_ATTENTION = ("sdpa", "megatron")
"""Core attention of the local spec: ``megatron_mesh.model.attention.SDPAttention`` or megatron-core's
``DotProductAttention``."""


def local_block_spec(core_attention: str = "sdpa") -> RecursiveBlockSubmodules:
    """Pure-PyTorch megatron-core modules: runs on CPU and GPU (apex's fused LayerNorm when
    installed, else ``SequenceParallelLayerNorm``).

    ``core_attention="sdpa"`` (the default, on CPU as on GPU) computes attention with torch's
    ``scaled_dot_product_attention`` (``SDPAttention``): flash / memory-efficient kernels on a
    GPU instead of a materialised [b, heads, s, s] score matrix, and equal to megatron-core's
    ``DotProductAttention`` to fp32 rounding (tests/model/test_attention.py), with the same (no)
    parameters, so checkpoints load across the two and CPU tests check the code a GPU run uses.
    ``"megatron"`` keeps megatron-core's ``DotProductAttention`` for comparisons and for what
    SDPAttention refuses (explicit masks, sliding windows, softmax offsets).
    """
    if core_attention not in CORE_ATTENTION:
        raise ValueError(f"core_attention={core_attention!r}: expected one of {CORE_ATTENTION}")
    submodules = get_gpt_layer_local_spec().submodules
    if core_attention == "sdpa":
        attention = submodules.self_attention
        submodules = dataclasses.replace(submodules, self_attention=dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules,
                                                      core_attention=SDPAttention)))
    norm = SequenceParallelNorm if gpt_layer_specs.LNImpl is WrappedTorchNorm else _apex_or_torch_norm
    submodules = dataclasses.replace(submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    layer = ModuleSpec(module=TransformerLayer, submodules=submodules)
    return RecursiveBlockSubmodules(layer=layer, final_layernorm=norm, qk_norm=SequenceParallelNorm)


def _apex_or_torch_norm(config, hidden_size: int, eps: float = 1e-5, **kwargs):
    """apex's FusedLayerNorm where installed, for LayerNorm (it has no RMSNorm)."""
    if config.normalization != "LayerNorm":
        return SequenceParallelNorm(config, hidden_size, eps)
    return gpt_layer_specs.LNImpl(config=config, hidden_size=hidden_size, eps=eps, **kwargs)


def te_block_spec() -> RecursiveBlockSubmodules:
    """TransformerEngine modules (fused norm-linear, TE attention; TE reads LayerNorm or RMSNorm
    from the config). Needs TE importable."""
    from megatron.core.extensions.transformer_engine import TENorm

    layer = get_gpt_layer_with_transformer_engine_spec()
    return RecursiveBlockSubmodules(layer=layer, final_layernorm=TENorm, qk_norm=TENorm)


def transformer_engine_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def default_block_spec() -> RecursiveBlockSubmodules:
    """The TransformerEngine spec when TE imports, otherwise the local spec (SDPA attention)."""
    return te_block_spec() if transformer_engine_available() else local_block_spec()
