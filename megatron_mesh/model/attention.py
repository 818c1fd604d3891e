"""SDPAttention: megatron-core's DotProductAttention computed by torch's fused attention.

megatron-core's local (non-TransformerEngine) core attention, ``DotProductAttention``
(transformer/dot_product_attention.py), materialises the [b, heads, s, s] score matrix with
``baddbmm`` and a separate softmax and dropout. ``SDPAttention`` is a drop-in for it as the
``core_attention`` submodule of megatron-core's ``SelfAttention``: same constructor and forward
signature, same parameters (none), same result, but computed by
``torch.nn.functional.scaled_dot_product_attention``, which on a GPU dispatches to the
flash / memory-efficient kernels (O(s) activation memory, no score matrix) and on the CPU to
torch's fused or math kernel.

What it reproduces of DotProductAttention (file:line are megatron-core 0.19.2's
transformer/dot_product_attention.py unless named):

* the causal mask built from ``attn_mask_type=causal`` with ``attention_mask=None``, and no mask
  at all for a single query (KV-cache decoding) - fusions/fused_softmax.py:323-327;
* the softmax scale: ``softmax_scale`` or 1/sqrt(head_dim) (:82-85); with
  ``apply_query_key_layer_scaling`` megatron divides the score matmul by layer_number (:87-89) and
  multiplies the scores back by it in fp32 inside the softmax (fused_softmax.py:316), so the
  effective scale is unchanged; that split only guards an fp16 score matmul against overflow,
  which SDPA's kernels (fp32 accumulation) do not have, so the effective scale is used directly;
* grouped-query attention: K/V heads repeated with ``repeat_interleave`` over the head dimension
  (:167-173), so query head i reads K/V group i // (heads / groups);
* tensor-parallel head splitting: heads and groups per partition divided by the TP size (:74-77);
* attention dropout (``attention_dropout`` argument, else ``config.attention_dropout``, :109-111)
  drawn under the tensor-parallel RNG tracker's fork unless sequence parallelism is on (:218-222;
  megatron's TransformerBlock runs the whole block inside that fork under SP), so TP ranks,
  which hold different heads, draw different masks. The masks themselves differ from
  DotProductAttention's (SDPA draws them inside the kernel), so with dropout the two agree in
  distribution, not sample by sample.

Softmax precision: SDPA's kernels accumulate the softmax in fp32 whatever the input dtype, i.e.
``attention_softmax_in_fp32=True`` (megatron's default); ``False`` is not reproduced bit for bit.

Refused with a ValueError naming the setting: an explicit ``attention_mask`` tensor (padding or
arbitrary masks; the causal mask is built by the kernel), any ``attn_mask_type`` but causal at
construction (or padding/arbitrary at forward), ``attention_bias``, ``packed_seq_params``
(THD packing), ``context_parallel_size`` > 1, sliding-window attention (``window_size``), a
non-vanilla ``softmax_type``, and cross attention. DotProductAttention asserts on the same
bias / packing / CP settings; masks, windows and softmax offsets it implements and this does not.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_mesh.config.model import refuse_unsupported

_OWNER = "SDPAttention (torch scaled_dot_product_attention core attention)"
_FORWARD_MASK_TYPES = (None, AttnMaskType.causal, AttnMaskType.no_mask)
"""Mask types SelfAttention may pass at forward: its own (causal), or no_mask when decoding
with a KV cache (attention.py:629); like DotProductAttention, which ignores the forward
argument, both mean the causal mask of the construction-time type (no mask for one query)."""


class SDPAttention(MegatronModule):
    """Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask=None)
    -> context [sq, b, np * hn], with np/ng the query heads/groups of this TP partition.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        refuse_unsupported({
            "attn_mask_type": (attn_mask_type, AttnMaskType.causal),
            "attention_type": (attention_type, "self"),
            "context_parallel_size": (config.context_parallel_size, 1),
            "window_size": (config.window_size, None),
            "softmax_type": (config.softmax_type, "vanilla"),
        }, _OWNER)
        del cp_comm_type  # only meaningful with context parallelism, refused above

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention's pg_collection must have a tp process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = self.tp_group.size()

        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)

        # The effective scale of DotProductAttention: its layer-number division (:87-89) is
        # undone by FusedScaleMaskSoftmax's fp32 multiplication (fused_softmax.py:316).
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = softmax_scale

        self.attention_dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout)
        self.softmax_offset = None  # DotProductAttention's attribute for softmax_type='vanilla'

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError(
                f"attention_mask (an explicit [b, 1, sq, sk] mask tensor, attn_mask_type="
                f"{attn_mask_type or self.attn_mask_type}) is not supported by {_OWNER}: it "
                "builds the causal mask itself; pass attention_mask=None "
                "(create_attention_mask=False) or use local_block_spec(core_attention='megatron')")
        for name, given in (("attention_bias", attention_bias),
                            ("packed_seq_params", packed_seq_params)):
            if given is not None:
                raise ValueError(f"{name} (given a {type(given).__name__}) is not supported by "
                                 f"{_OWNER} (expected None)")
        if attn_mask_type not in _FORWARD_MASK_TYPES:
            raise ValueError(f"attn_mask_type={attn_mask_type!r} is not supported by {_OWNER} "
                             f"(expected causal)")

        sq, b = query.shape[:2]
        sk = key.size(0)
        if sq > 1 and sq != sk:  # fused_softmax.py:326 asserts the same
            raise ValueError(f"causal attention needs as many queries as keys, got sq={sq}, "
                             f"sk={sk} (a KV cache with several new tokens is not supported by "
                             f"{_OWNER})")

        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:  # GQA: [sk, b, ng, hn] -> [sk, b, np, hn], as DotProductAttention
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)

        # [s, b, n, hn] -> [b, n, s, hn] views; SDPA takes strided inputs
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.attention_dropout_p if self.training else 0.0
        attend = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, dropout_p=dropout_p, is_causal=sq > 1, scale=self.softmax_scale)
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()

        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, hp]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
