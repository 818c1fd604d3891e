"""MeshGPTModel: embeddings -> RecursiveMeshTransformerBlock -> output layer (tied or not).

Built on megatron-core's ``LanguageModule`` and its embedding, rotary and parallel-linear
modules rather than on ``GPTModel``: ``GPTModel`` hard-codes its ``TransformerBlock`` (so a
subclass would build and discard a full stack) and is deprecated in 0.19 in favour of
``HybridModel``, whose layer-pattern language has no notion of a looped core. The pieces used
here are the stable building blocks both of them share.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType

from megatron_mesh.config.model import MeshConfig
from megatron_mesh.model.block import RecursiveMeshTransformerBlock, StateList
from megatron_mesh.model.layers import RecursiveBlockSubmodules
from megatron_mesh.parallel import carry as boundary
from megatron_mesh.parallel import stages
from megatron_mesh.recurrence.exit_gate import ExitLoss, ExitObjective, exit_loss


class MeshGPTModel(LanguageModule):
    """Causal LM (GPT-NeoX or Llama layers: MeshConfig.layer_family) around the recursive block.

    Under pipeline parallelism it is one stage of the unrolled graph: model chunk ``vp_stage``
    (virtual pipelining) of this pipeline rank (``megatron_mesh.parallel.stages``, ``.carry``).

    forward(input_ids [b, s], position_ids [b, s]) returns logits [b, s, V] (vocab-parallel
    unless ``parallel_output=False``), or, given labels [b, s], the per-token loss [b, s]; with
    exit gates (config.exit_gate) and the layout's depth, the per-token ``ExitLoss`` instead.
    """

    def __init__(
        self,
        config: MeshConfig,
        spec: Optional[RecursiveBlockSubmodules] = None,
        parallel_output: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = config.tie_embeddings
        self.parallel_output = parallel_output
        self.vocab_size = config.vocab_size
        self.input_tensor: Optional[Tensor] = None
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=config.vocab_size,
                max_sequence_length=config.max_sequence_length,
                position_embedding_type="rope",
                tp_group=self.pg_collection.tp,
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=config.rotary_percent,
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=config.rotary_base,
            rope_scaling=config.rope_scaling_factor is not None,
            rope_scaling_factor=config.rope_scaling_factor or 1.0,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )
        pp = self.pg_collection.pp
        if pp.size() != config.pipeline_model_parallel_size:
            raise ValueError(f"pipeline group of {pp.size()} ranks, but the config says "
                             f"pipeline_model_parallel_size={config.pipeline_model_parallel_size}")
        self.vp_stage = vp_stage
        self.stage = stages.stage_of(config, stages.stage_index(config, pp.rank(), vp_stage))
        self.decoder = RecursiveMeshTransformerBlock(config, spec, self.pg_collection, self.stage)
        # what the carry holds where this stage receives it and where it hands it on
        self.carry_phases = tuple(stages.boundary_phase(config, q) for q in self.stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                config.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and config.tie_embeddings,
                tp_group=self.pg_collection.tp,
            )
        self.setup_embeddings_and_output_layer()
        if config.exit_gate and config.exit_training == "gate_only":
            self._train_exit_gates_only()

    def _train_exit_gates_only(self) -> None:
        """Ouro's stage II: the language model frozen (megatron's DDP and optimizer leave out
        parameters without requires_grad), the exit gates trained alone."""
        gates = {id(p) for p in self.decoder.exit_gate.parameters()}  # no pipeline: always built
        for param in self.parameters():
            param.requires_grad_(id(param) in gates)

    def set_input_tensor(self, input_tensor) -> None:
        """What the previous pipeline stage sent (megatron's schedules call this every step)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        num_loops: Optional[int] = None,
        states: StateList = None,
        backprop_loops: Optional[int] = None,
        step_mask: Optional[Tensor] = None,
    ) -> Union[Tensor, ExitLoss]:
        rotary_pos_emb = self.rotary_pos_emb(input_ids.shape[1])
        if self.pre_process:
            h_emb = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
            h_emb, carry = h_emb * self.decoder.embedding_scale(), None
        else:  # a later pipeline stage: [s, b, W] from the previous one
            h_emb, carry = None, boundary.unpack(self.input_tensor, self.carry_phases[0], self.config)
        exits = labels is not None and self.decoder.exit_gate is not None and num_loops is None
        readouts = [] if exits else None
        h = self.decoder(h_emb, attention_mask, rotary_pos_emb, num_loops=num_loops, states=states,
                         carry=carry, backprop_loops=backprop_loops, step_mask=step_mask,
                         readouts=readouts)
        if not self.post_process:
            return boundary.pack(h, self.carry_phases[1], self.config)
        if exits:
            return self._exit_loss([*readouts, h], labels)
        logits = self._logits(h)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()  # [b, s, V/tp]
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _logits(self, h: Tensor) -> Tensor:  # [s, b, h] -> [s, b, V/tp]
        tied = self.share_embeddings_and_output_weights
        weight = self.shared_embedding_or_output_weight() if tied else None
        logits, _ = self.output_layer(h, weight=weight)
        return logits

    def _exit_loss(self, readouts: List[Tensor], labels: Tensor) -> ExitLoss:
        """The learned-exit objective from the readouts z(1..K) [s(/tp), b, h] (exit_gate.py)."""
        losses = torch.stack([self.compute_language_model_loss(labels, self._logits(z))
                              for z in readouts])  # [K, b, s]
        gate_logits = self.decoder.exit_gate(readouts[:-1])  # [K - 1, s(/tp), b]
        if self.config.sequence_parallel:  # each rank gated its own tokens: gather them all
            gate_logits = tensor_parallel.gather_from_sequence_parallel_region(
                gate_logits.transpose(0, 1), tensor_parallel_output_grad=False,
                group=self.pg_collection.tp).transpose(0, 1)
        return exit_loss(gate_logits.transpose(1, 2), losses, ExitObjective.of(self.config))
