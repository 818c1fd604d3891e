"""GPT-NeoX layers for megatron-core: the parallel-residual TransformerLayer and its specs.

GPT-NeoX / Pythia compute ``x + attn(ln1(x)) + mlp(ln2(x))`` (HF ``use_parallel_residual=True``);
megatron-core's TransformerLayer is sequential (``mlp`` reads ``x + attn(...)``) and has no flag
for it, so a subclass reorders the same submodules. Everything else (attention, rotary, linear
layers, bias-dropout-add, layernorm recompute) is megatron-core's, except that the local spec's
core attention is ``megatron_mesh.model.attention.SDPAttention`` (torch's fused attention) by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

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


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm that also works under sequence parallelism.

    Under SP each tensor-parallel rank normalises its own tokens, so the weight and bias
    gradients are per-rank partial sums; flagging them ``sequence_parallel`` makes megatron-core
    all-reduce them over the TP group (distributed/finalize_model_grads.py), which is what
    apex's FusedLayerNorm does. megatron-core's torch fallback (transformer/torch_norm.py:51,
    WrappedTorchNorm) refuses SP instead, which would leave CPU runs without it.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        refuse_unsupported({
            "normalization": (config.normalization, "LayerNorm"),
            "layernorm_zero_centered_gamma": (config.layernorm_zero_centered_gamma, False),
            "memory_efficient_layer_norm": (config.memory_efficient_layer_norm, False),
        }, "the torch LayerNorm of the local spec")
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


@dataclass
class RecursiveBlockSubmodules:
    """What the recursive block is built from."""

    layer: ModuleSpec
    """Spec of every transformer layer (prelude, core and coda)."""
    final_layernorm: Union[ModuleSpec, type]
    """Norm after the coda."""


def _with_parallel_residual(spec: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(module=ParallelResidualTransformerLayer, submodules=spec.submodules)


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
    if gpt_layer_specs.LNImpl is WrappedTorchNorm:
        submodules = dataclasses.replace(submodules, input_layernorm=SequenceParallelLayerNorm,
                                         pre_mlp_layernorm=SequenceParallelLayerNorm)
    layer = ModuleSpec(module=ParallelResidualTransformerLayer, submodules=submodules)
    return RecursiveBlockSubmodules(layer=layer, final_layernorm=submodules.input_layernorm)


def te_block_spec() -> RecursiveBlockSubmodules:
    """TransformerEngine modules (fused layernorm-linear, TE attention). Needs TE importable."""
    from megatron.core.extensions.transformer_engine import TENorm

    layer = _with_parallel_residual(get_gpt_layer_with_transformer_engine_spec())
    return RecursiveBlockSubmodules(layer=layer, final_layernorm=TENorm)


def transformer_engine_available() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def default_block_spec() -> RecursiveBlockSubmodules:
    """The TransformerEngine spec when TE imports, otherwise the local spec (SDPA attention)."""
    return te_block_spec() if transformer_engine_available() else local_block_spec()
