"""The model, data and forward-step providers that megatron.training.pretrain calls.

``MeshProviders`` holds what the model and forward-step providers share across megatron's calls
(this rank's model chunks until all are built, the router log): one object per run, made by
``tools/pretrain_mesh.py``, nothing kept at module level.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Dict, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args, get_tokenizer
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_mesh.config.model import DERIVED_FIELDS, MeshConfig
from megatron_mesh.model.gpt import MeshGPTModel
from megatron_mesh.model.layers import local_block_spec, te_block_spec
from megatron_mesh.parallel import carry, replicas
from megatron_mesh.recurrence.exit_gate import ExitLoss
from megatron_mesh.recurrence.loop_depth import LoopDepth
from megatron_mesh.training.router_log import RouterLog
from megatron_mesh.training.throughput import DepthTally, rank_device

def mesh_config_from_args(args) -> MeshConfig:
    """Megatron's TransformerConfig fields (parallelism, precision, fusions) + the model section."""
    base = core_transformer_config_from_args(args)
    runtime = {f.name: getattr(base, f.name) for f in fields(TransformerConfig)
               if f.init and f.name not in DERIVED_FIELDS}
    config = MeshConfig.from_json(args.mesh_model, **runtime,
                                  pipeline_stage_layers=args.mesh_pipeline_stage_layers)
    if args.pipeline_model_parallel_size > 1:
        # every boundary sends [s, b, W], W the widest carry of the split, so megatron's
        # schedules need no shape exchange (megatron_fixes: _pipeline_carry_shape)
        config.pipeline_carry_width = carry.carry_width(config)
    return config


class MeshProviders:
    """``model_provider`` and ``forward_step`` for megatron's pretrain, with their shared state."""

    def __init__(self, router_log: Optional[RouterLog] = None,
                 depth_tally: Optional[DepthTally] = None):
        self.router_log = router_log or RouterLog(enabled=False)
        self.depth_tally = depth_tally or DepthTally()
        """Where the training micro-batches' depth draws go (the throughput log reads them)."""
        self.rank_chunks: List[MeshGPTModel] = []
        """This rank's model chunks built so far (megatron's get_model builds 0, 1, ... in turn)."""
        self.depth: Optional[LoopDepth] = None
        """The loop-depth sampler of the model built (loop_depth.py)."""
        self.microbatches = MicrobatchCounter()

    def model_provider(self, pre_process=True, post_process=True, vp_stage=None, config=None,
                       pg_collection=None) -> MeshGPTModel:
        args = get_args()
        cfg = mesh_config_from_args(args)
        spec = te_block_spec() if args.transformer_impl == "transformer_engine" else local_block_spec()
        model = MeshGPTModel(cfg, spec=spec, pg_collection=pg_collection, pre_process=pre_process,
                             post_process=post_process, vp_stage=vp_stage)
        self.depth = LoopDepth.of(cfg)
        if args.pipeline_model_parallel_size > 1:
            self._connect_when_all_chunks_built(model)
            cfg.finalize_model_grads_func = _finalize_with_stage_replicas
        return model

    def _connect_when_all_chunks_built(self, model: MeshGPTModel) -> None:
        """Replicated core weights can be tied only once every chunk of this rank exists: under
        virtual pipelining two chunks of one rank may hold copies of the same layer."""
        if not model.vp_stage:
            self.rank_chunks.clear()
        self.rank_chunks.append(model)
        if len(self.rank_chunks) == (model.config.virtual_pipeline_model_parallel_size or 1):
            replicas.connect_replicas([m.decoder for m in self.rank_chunks], model.config,
                                      model.pg_collection.pp)
            self.rank_chunks.clear()

    def forward_step(self, data_iterator, model: MeshGPTModel):
        tokens, labels, loss_mask, position_ids = get_batch(data_iterator)
        states = self.router_log.states_for(model)  # a list on the micro-batch whose routers are logged
        output = model(tokens, position_ids, None, labels=labels, states=states,
                       **self.loop_draw(model.training, _chunk(model)))  # [b, s] token loss
        self.router_log.write(model, states)
        if isinstance(output, ExitLoss):  # exit gates (config.exit_gate): the objective trains
            return output.objective, partial(exit_loss_func, loss_mask, output)
        return output, partial(loss_func, loss_mask)


    def loop_draw(self, training: bool, chunk: Optional[int] = None) -> dict:
        """This training micro-batch's depth, a function of the seed, the iteration (which also
        sets a depth curriculum's mean) and (per sequence or token) the sequences' places in the
        global batch: the same on every rank holding them, and after a resume; evaluation runs
        the layout's K steps. Under pipeline parallelism every
        stage draws it and masks it into the layout's fixed graph (``LoopDepth.graph_steps``)."""
        if not training or self.depth is None or not self.depth.varies:
            return {}
        args = get_args()
        rows = self.microbatches.rows(args.curr_iteration, args.micro_batch_size, chunk)
        pipelined = args.pipeline_model_parallel_size > 1
        graph_steps = self.depth.graph_steps if pipelined else None
        draw = self.depth.draw(args.seed, args.curr_iteration, rows, args.seq_length, graph_steps)
        if not chunk:  # one tally per micro-batch, not per model chunk
            self.depth_tally.add(args.curr_iteration, draw)
        out = {"backprop_loops": draw.backprop_loops}
        if not pipelined:  # a pipeline stage runs the layout's graph, the draw masked into it
            out["num_loops"] = draw.num_loops
        if draw.active is not None:
            out["step_mask"] = torch.from_numpy(draw.active).to(rank_device())
        return out


@dataclass
class MicrobatchCounter:
    """Which sequences of the global batch a training forward step holds. Megatron's
    pretraining sampler gives data-parallel rank r the micro-batch size (mbs) sequences at
    r * mbs of each consecutive dp * mbs of the global batch, and forward_step does not learn
    which micro-batch it runs: it is counted, per model chunk (megatron's schedules run each
    chunk's forward steps in micro-batch order), modulo the micro-batches per step (megatron's
    rerun state machine may run a step's forward-backward again, replaying the same data)."""

    iteration: int = -1
    counts: Dict[Optional[int], int] = field(default_factory=dict)
    """Forward steps so far this iteration, per model chunk (virtual pipeline stage)."""

    def rows(self, iteration: int, micro_batch_size: int, chunk: Optional[int] = None) -> range:
        if iteration != self.iteration:
            self.iteration, self.counts = iteration, {}
        count = self.counts.get(chunk, 0)
        self.counts[chunk] = count + 1
        index = count % get_num_microbatches()
        dp = parallel_state.get_data_parallel_world_size()
        start = (index * dp + parallel_state.get_data_parallel_rank()) * micro_batch_size
        return range(start, start + micro_batch_size)


def _chunk(model) -> Optional[int]:
    """The virtual pipeline stage of a (DDP- and Float16Module-wrapped) model chunk."""
    return get_attr_wrapped_model(model, "vp_stage")


def _finalize_with_stage_replicas(model, *args, **kwargs):
    """megatron-core's finalize_model_grads, after summing the gradients of core layers (and
    scheme weights) over the pipeline stages that hold copies of them."""
    from megatron.core.distributed import finalize_model_grads

    replicas.sum_replica_grads(model)
    return finalize_model_grads(model, *args, **kwargs)


def get_batch(data_iterator):
    """tokens, labels, loss_mask, position_ids of the next micro-batch ([b, s] each)."""
    batch = next(data_iterator)
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return tuple(batch[k].to(rank_device(), non_blocking=True) for k in keys)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses, the token count, and the 'lm loss' report for the log."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])
    return loss, num_tokens, {"lm loss": report}


def exit_loss_func(loss_mask: torch.Tensor, exits: ExitLoss, output_tensor: torch.Tensor):
    """``loss_func`` of the exit objective, reporting beside it (each a masked token mean):
    'lm loss', the expected loss over the gates' exits; 'lm loss at K', after all K loop steps;
    'exit step', the expected loop steps; 'exit entropy', of the exit distribution (nats)."""
    loss, num_tokens, report = loss_func(loss_mask, output_tensor)
    mask = loss_mask.view(-1).float()

    def mean_of(values: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sum(values.detach().view(-1).float() * mask), mask.sum()])

    report = {"lm loss": mean_of(exits.expected_loss), "exit objective": report["lm loss"],
              "lm loss at K": mean_of(exits.final_loss), "exit step": mean_of(exits.exit_step),
              "exit entropy": mean_of(exits.entropy)}
    return loss, num_tokens, report


def _check_data(args) -> None:
    """Integrity checks on open: index/bin consistency, a non-empty dataset (megatron's own
    open of an empty one fails naming no file), token range, tokenizer vocabulary."""
    from megatron_mesh.data.integrity import (check_token_range, check_tokenizer_vocab,
                                              open_indexed_dataset)

    check_tokenizer_vocab(get_tokenizer().vocab_size, args.padded_vocab_size,
                          args.tokenizer_model or args.tokenizer_type)
    for paths in (args.data_path, args.train_data_path, args.valid_data_path, args.test_data_path):
        for prefix in (p for p in (paths or []) if not _is_weight(p)):
            check_token_range(open_indexed_dataset(prefix), prefix, args.padded_vocab_size)


def _is_weight(item: str) -> bool:
    try:
        float(item)
        return True
    except ValueError:
        return False


def _pythia_datasets(args):
    from megatron_mesh.data.pythia import PythiaPreshuffledDataset

    prefix = (args.data_path or args.train_data_path)[-1]
    train = PythiaPreshuffledDataset(prefix, args.seq_length, args.mesh_pythia_boundary,
                                     eod_id=get_tokenizer().eod, mask_eod_loss=args.eod_mask_loss,
                                     vocab_size=args.padded_vocab_size)
    return train, None, None


def _dataset_config(args) -> GPTDatasetConfig:
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    if not args.mock_data:
        _check_data(args)
    if args.mesh_data_format == "pythia_preshuffled":
        return _pythia_datasets(args)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        lambda: True,  # every rank reads its batches itself (no TP broadcast of batches)
        _dataset_config(args),
    ).build()


train_valid_test_datasets_provider.is_distributed = True
