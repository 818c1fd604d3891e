"""GPT-NeoX layers for megatron-core: the parallel-residual TransformerLayer and its specs.

GPT-NeoX / Pythia compute ``x + attn(ln1(x)) + mlp(ln2(x))`` (HF ``use_parallel_residual=True``);
megatron-core's TransformerLayer is sequential (``mlp`` reads ``x + attn(...)``) and has no flag
for it, so a subclass reorders the same submodules. Everything else (attention, rotary, linear
layers, bias-dropout-add, layernorm recompute) is megatron-core's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.typed_torch import apply_module
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_mesh.config import refuse_unsupported


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
        # [s, b, h] -> [s, b, h]
        ln2_out = self._forward_pre_mlp_layernorm(hidden_states)
        if isinstance(ln2_out, tuple):  # fused norms that also return the residual
            ln2_out = ln2_out[0]
        mlp_output_with_bias = apply_module(self.mlp)(ln2_out)
        # x + attn(ln1(x)) through megatron's own attention path
        attn_residual, context = self._forward_attention(hidden_states, *args, **kwargs)
        # + mlp(ln2(x)) through megatron's bias-dropout-add (and pre-MLP-norm recompute)
        return self._forward_post_mlp(mlp_output_with_bias, attn_residual), context


@dataclass
class RecursiveBlockSubmodules:
    """What the recursive block is built from."""

    layer: ModuleSpec
    """Spec of every transformer layer (prelude, core and coda)."""
    final_layernorm: Union[ModuleSpec, type]
    """Norm after the coda."""


def _with_parallel_residual(spec: ModuleSpec) -> ModuleSpec:
    return ModuleSpec(module=ParallelResidualTransformerLayer, submodules=spec.submodules)


def local_block_spec() -> RecursiveBlockSubmodules:
    """Pure-PyTorch megatron-core modules: runs on CPU and GPU."""
    layer = _with_parallel_residual(get_gpt_layer_local_spec())
    return RecursiveBlockSubmodules(layer=layer, final_layernorm=layer.submodules.input_layernorm)


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
    """The TransformerEngine spec when TE imports, otherwise the local spec."""
    return te_block_spec() if transformer_engine_available() else local_block_spec()
