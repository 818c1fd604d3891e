"""RecursiveMeshTransformerBlock: prelude -> loop(core, state scheme) -> coda -> final norm.

The core's layers exist once (tied layouts) and are applied K times; untied layouts
(``4+8+8+4``) build one core per loop step. Between loop steps the state scheme of
``megatron_mesh.recurrence.mesh`` decides h(t+1) (for MeSH: the buffer write/read of Algorithm 2).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor

from megatron_mesh.config.model import MeshConfig, refuse_unsupported
from megatron_mesh.model.layers import RecursiveBlockSubmodules, default_block_spec, family_layer_spec
from megatron_mesh.parallel.replicas import TIED_COPY, mark_replica_ids
from megatron_mesh.recurrence.exit_gate import ExitGate
from megatron_mesh.recurrence.mesh import LoopState, SchemeOptions
from megatron_mesh.recurrence.schemes import build_scheme, has_per_step_parameters
from megatron_mesh.recurrence.unrolled import Carry, Op, stage_ops, unrolled_ops

StateList = Optional[List[Tuple[str, Tensor]]]


class Recorded:
    """Names of the states ``RecursiveMeshTransformerBlock.forward(states=[...])`` records, in
    execution order; probes, depth studies and tests look them up by these."""

    EMBEDDINGS = "h_emb"
    """The (scaled) token embeddings the block starts from."""
    PRELUDE = "prelude"
    """The prelude's output (a vanilla layout's last layer output)."""
    CODA = "coda"
    """The coda's output, before the final norm."""

    @staticmethod
    def loop_state(t: int) -> str:
        """h(t): the core's input at loop step t; h(0) comes out of the transitional step."""
        return f"h{t}"

    CODA_INPUT = "coda_input"
    """What the coda reads: ``scheme.end(h(K))`` (h(K) but for the injection schemes' readout)."""

    @staticmethod
    def core_input(t: int) -> str:
        """u(t), the core's input at loop step t: ``scheme.inject(h(t))`` (h(t) but for the
        input injection schemes)."""
        return f"u{t}"

    @staticmethod
    def core_output(t: int) -> str:
        """f_core(h(t)), before the scheme mixes it into h(t + 1)."""
        return f"core{t}"


def _refuse_unsupported(config: MeshConfig) -> None:
    """Settings megatron-core accepts but this block does not implement yet: fail loudly."""
    refuse_unsupported({"context_parallel_size": (config.context_parallel_size, 1)},
                       "RecursiveMeshTransformerBlock yet")


def _mark_sequence_parallel(scheme: Optional[nn.Module], sequence_parallel: bool) -> None:
    """Routers and combination weights are replicated over tensor-parallel ranks. Under sequence
    parallelism each rank feeds them its own tokens, so their gradients are partial sums:
    megatron-core all-reduces the gradients of parameters flagged ``sequence_parallel`` over the
    tensor-parallel group (distributed/finalize_model_grads.py), as for its layer norms."""
    for param in scheme.parameters() if scheme is not None else ():
        setattr(param, "sequence_parallel", sequence_parallel)


class _Recorder:
    """Appends (name, state) to the caller's list, if it passed one (``forward(states=...)``)."""

    def __init__(self, states: StateList):
        self.states = states

    def __call__(self, name: str, h: Tensor) -> None:
        if self.states is not None:
            self.states.append((name, h))


def _layer_number(layout, op: Op) -> int:
    """megatron-core's 1-based layer_number, unique per layer that owns weights (not per
    application) and the same whichever pipeline stage builds the layer."""
    if op.segment == "prelude":
        return op.index + 1
    if op.segment == "core":
        return layout.prelude + sum(layout.core_modules[:op.module]) + op.index + 1
    return layout.prelude + sum(layout.core_modules) + op.index + 1


def _param_device(config: MeshConfig):
    """Where megatron-core puts parameters: the current GPU unless use_cpu_initialization."""
    if config.use_cpu_initialization:
        return contextlib.nullcontext()  # default device (or an enclosing torch.device("meta"))
    return torch.device("cuda", torch.cuda.current_device())


def _apply_layers(layers, h: Tensor, attention_mask: Optional[Tensor],
                  rotary_pos_emb: Optional[Tensor]) -> Tensor:
    """Consecutive layers as one function of (h, mask, rotary): the unit of full recompute."""
    for layer in layers:
        h, _ = layer(h, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
    return h


class _StepGate:
    """Per-sequence / per-token loop depth: loop step t updates only the elements ``mask[t]``
    marks; the others keep the h(t) and scheme state they entered the step with. A gate
    without a mask passes every step through."""

    def __init__(self, mask: Optional[Tensor]):
        self.mask = mask  # [steps, s|1, b, 1] bool, or None
        self.entry: Optional[Carry] = None

    def enter(self, carry: "Carry") -> None:
        """The carry a loop step starts from (before the scheme's injection)."""
        if self.mask is not None:
            self.entry = carry

    def __call__(self, t: int, h: Tensor, state: LoopState) -> Tuple[Tensor, LoopState]:
        if self.mask is None:
            return h, state
        keep = self.mask[t]
        # with gradients even in a frozen step: an element sitting it out keeps the graph of
        # the state it entered with (e.g. h(0) from the prelude, its steps still to come)
        with torch.enable_grad():
            return torch.where(keep, h, self.entry.h), state.where(keep, self.entry.state)


class _Readouts:
    """Where ``forward(readouts=[...])`` collects the readouts after loop steps 1..K-1."""

    def __init__(self, outputs: Optional[List[Tensor]], loops: int, ops: List[Op]):
        self.outputs, self.loops = outputs, loops
        self.coda_ops = [op for op in ops if op.kind == "layer" and op.segment == "coda"]

    def after(self, op: Op) -> bool:
        """Whether a readout follows ``op``: every loop step's end but the last one's."""
        return self.outputs is not None and op.kind == "step" and op.index < self.loops - 1


class RecursiveMeshTransformerBlock(MegatronModule):
    """The transformer stack of a Prelude-Recurrent-Coda model. Input and output are [s, b, h].

    ``stage`` = (start, end) builds only the layer applications [start, end) of the unrolled graph
    (a pipeline stage): the layers they use, the state scheme if they run any of its steps, and
    the final norm on the last stage. Layers keep their full-model names (``prelude.i``,
    ``cores.c.j``, ``coda.i``) so checkpoints are the same for every split.
    """

    def __init__(
        self,
        config: MeshConfig,
        spec: Optional[RecursiveBlockSubmodules] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        stage: Optional[Tuple[int, int]] = None,
    ):
        super().__init__(config=config)
        _refuse_unsupported(config)
        spec = spec or default_block_spec()
        layer_spec = family_layer_spec(spec, config)
        self.pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        layout = config.parsed_layout
        self.stage = stage or (0, layout.n_compute)
        self.ops = stage_ops(unrolled_ops(layout), *self.stage)
        layer_ops = [op for op in self.ops if op.kind == "layer"]

        def build(op: Op) -> nn.Module:
            return build_module(layer_spec, config=config, layer_number=_layer_number(layout, op),
                                add_layer_offset=False, pg_collection=self.pg_collection)

        def held(segment: str, module: int = 0) -> nn.ModuleDict:
            ops = {op.index: op for op in layer_ops if op.segment == segment and op.module == module}
            return nn.ModuleDict({str(i): build(ops[i]) for i in sorted(ops)})

        # Registered in the order of first use (prelude, scheme: its transitional step follows
        # the prelude, cores, coda): megatron's DDP chains the parameter all-gathers of
        # overlap_param_gather in registration order, and a bucket used before its turn costs
        # the overlap ("next bucket's parameter all-gather ... already dispatched").
        self.prelude = held("prelude")
        self.scheme = None
        if any(op.kind != "layer" for op in self.ops):
            with _param_device(config):
                self.scheme = build_scheme(config.state_scheme, SchemeOptions.of(config))
            _mark_sequence_parallel(self.scheme, config.sequence_parallel)
        self.cores = nn.ModuleList(held("core", c) for c in range(len(layout.core_modules)))
        self.coda = held("coda")
        self.final_layernorm = None
        self.exit_gate = None
        if self.is_last_stage:
            self.final_layernorm = build_module(spec.final_layernorm, config=config,
                                                hidden_size=config.hidden_size,
                                                eps=config.layernorm_epsilon)
            if config.exit_gate:  # reads the final norm's output after every loop step
                with _param_device(config):
                    self.exit_gate = ExitGate(config.hidden_size, layout.num_loops)
                _mark_sequence_parallel(self.exit_gate, config.sequence_parallel)

    @property
    def is_last_stage(self) -> bool:
        return self.stage[1] == self.config.parsed_layout.n_compute

    @property
    def layers(self) -> List[nn.Module]:
        """Every layer this stage builds, once, in order (megatron-core code that walks
        ``decoder.layers``, e.g. schedules' set_current_microbatch, sees each layer once; under
        virtual pipelining a layer may compute with another chunk's weights)."""
        cores = (layer for core in self.cores for layer in core.values())
        return [*self.prelude.values(), *cores, *self.coda.values()]

    def core_for_step(self, t: int) -> List[nn.Module]:
        return list(self.cores[0 if self.config.parsed_layout.tied else t].values())

    def _layer(self, op: Op) -> nn.Module:
        if op.segment == "core":
            return self.cores[op.module][str(op.index)]
        return (self.prelude if op.segment == "prelude" else self.coda)[str(op.index)]

    def forward(
        self,
        hidden_states: Optional[Tensor],
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        num_loops: Optional[int] = None,
        states: StateList = None,
        carry: Optional[Carry] = None,
        backprop_loops: Optional[int] = None,
        step_mask: Optional[Tensor] = None,
        readouts: Optional[List[Tensor]] = None,
    ):
        """Run this block's share of the unrolled graph.

        The first stage starts from the (scaled) embeddings ``hidden_states`` [s, b, h]; a later
        pipeline stage from the ``carry`` of the one before. The last stage returns the final
        normed state [s, b, h], others their carry. ``num_loops`` reads out after fewer (or, for
        tied cores, more) loop steps than the layout trains with; ``backprop_loops`` runs all but the
        last that many without an autograd graph (truncated backprop); ``step_mask`` (bool
        [num_loops, b] or [num_loops, b, s], per-sequence or per-token depth: loop_depth.py)
        lets loop step t update only the sequences or tokens it marks. ``states``, if a list,
        receives (name, tensor) in execution order for probes and tests (names: ``Recorded``).
        ``readouts``, if a list, receives final_norm(coda(end(h(t)))) [s, b, h] after each loop
        step t = 1..K-1 but the last (whose readout is the return value): the exits of a learned
        exit gate (one stage holding the whole model).

        The ops (unrolled.py) run the recurrence
            h(0), state = scheme.begin(h_emb, prelude(h_emb))
            u(t) = scheme.inject(t, h(t), state)                    # = h(t) but for injection
            h(t+1), state = scheme(t, u(t), core(u(t)), state)      # t = 0..K-1
            out = final_norm(coda(scheme.end(h(K), state)))
        written out straight in ``hf/modeling_megatron_mesh.py`` and ``tests/reference.py`` (the
        paper's equations). A pipeline stage runs its slice of the ops from the carry it receives.
        """
        ops = self.ops
        if num_loops is not None:
            if self.stage != (0, self.config.parsed_layout.n_compute):
                raise ValueError("num_loops can only be changed when one stage holds the whole model")
            ops = unrolled_ops(self.config.parsed_layout, self._check_num_loops(num_loops))
        loops = self.config.parsed_layout.num_loops if num_loops is None else num_loops  # whole graph
        first_backprop_step = loops - (loops if backprop_loops is None else backprop_loops)
        record = _Recorder(states)
        gate = _StepGate(self._local_step_mask(step_mask, loops))
        if carry is None:
            carry = Carry(h=hidden_states, h_emb=hidden_states)
            record(Recorded.EMBEDDINGS, hidden_states)
        if readouts is not None and self.stage != (0, self.config.parsed_layout.n_compute):
            raise ValueError("readouts after every loop step need one stage holding the whole model")
        with self._rng_context():
            carry = self._run_ops(ops, carry, first_backprop_step, (attention_mask, rotary_pos_emb),
                                  record, gate, _Readouts(readouts, loops, ops))
        if not self.is_last_stage:
            return carry
        if not self.config.parsed_layout.recursive:
            record(Recorded.PRELUDE, carry.h)
        record(Recorded.CODA, carry.h)
        h = self.final_layernorm(carry.h)
        return make_viewless_tensor(h, requires_grad=h.requires_grad, keep_graph=True)

    def _read_out(self, carry: Carry, readouts: "_Readouts", layer_inputs: tuple) -> None:
        """Append final_norm(coda(end(h(t)))) for the loop step ``carry`` has just finished."""
        h = self.scheme.end(carry.h, carry.state)
        if readouts.coda_ops:
            h = self._run_layers(readouts.coda_ops, h, *layer_inputs)
        readouts.outputs.append(self.final_layernorm(h))

    def _run_ops(self, ops: List[Op], carry: Carry, first_backprop_step: int, layer_inputs: tuple,
                 record: "_Recorder", gate: "_StepGate", readouts: "_Readouts") -> Carry:
        """The ops in order, loop steps before ``first_backprop_step`` without gradients.

        Consecutive layer applications run together (the recompute chunks). A frozen layer
        run's output is detached: megatron-core's TransformerLayer adds the linear biases under
        torch.enable_grad() (bias_dropout_add_exec_handler), so a layer run under no_grad still
        returns a graph to its biases, which would get gradients through steps meant to have none.
        """
        def group(op: Op) -> Tuple[bool, bool]:  # (a layer, runs without gradients)
            return op.kind == "layer", 0 <= op.loop < first_backprop_step

        for (is_layer, frozen), run in itertools.groupby(ops, key=group):
            with torch.no_grad() if frozen else contextlib.nullcontext():
                if is_layer:
                    h = self._run_layers(list(run), carry.h, *layer_inputs)
                    h = h.detach() if frozen else h
                    carry = Carry(h, carry.h_emb, carry.h_loop, carry.state)
                else:
                    for op in run:
                        carry = self._scheme_op(op, carry, record, gate)
                        if readouts.after(op):
                            self._read_out(carry, readouts, layer_inputs)
        return carry

    def _scheme_op(self, op: Op, carry: Carry, record: "_Recorder", gate: "_StepGate") -> Carry:
        """One state-scheme operation of the recurrence (unrolled.Op kinds)."""
        if op.kind == "begin":
            record(Recorded.PRELUDE, carry.h)
            h, state = self.scheme.begin(carry.h_emb, carry.h)  # h(0)
            record(Recorded.loop_state(0), h)
            return Carry(h, h_loop=h, state=state)
        if op.kind == "inject":
            gate.enter(carry)
            u = self.scheme.inject(op.index, carry.h, carry.state)  # the core's input
            record(Recorded.core_input(op.index), u)
            return Carry(u, h_loop=u, state=carry.state)
        if op.kind == "step":
            record(Recorded.core_output(op.index), carry.h)
            h, state = self.scheme(op.index, carry.h_loop, carry.h, carry.state)  # h(t+1)
            h, state = gate(op.index, h, state)
            record(Recorded.loop_state(op.index + 1), h)
            return Carry(h, h_loop=h, state=state)
        h = self.scheme.end(carry.h, carry.state)  # end: what the coda reads
        record(Recorded.CODA_INPUT, h)
        return Carry(h)

    def _local_step_mask(self, step_mask: Optional[Tensor], loops: int) -> Optional[Tensor]:
        """``step_mask`` [steps, b(, s)] of the whole graph's ``loops`` steps as
        [steps, s|1, b, 1] over this rank's tokens (under sequence parallelism a rank holds the
        s / tp tokens of its own chunk)."""
        if step_mask is None:
            return None
        if step_mask.shape[0] != loops:
            raise ValueError(f"step_mask of {step_mask.shape[0]} steps for a graph of {loops} "
                             f"loop steps")
        mask = step_mask.transpose(1, 2) if step_mask.dim() == 3 else step_mask.unsqueeze(1)
        if self.config.sequence_parallel and mask.shape[1] > 1:
            tp = self.pg_collection.tp
            mask = mask.chunk(tp.size(), dim=1)[tp.rank()]
        return mask.unsqueeze(-1)  # [steps, s|1, b, 1]

    def _rng_context(self):
        """Under sequence parallelism each tensor-parallel rank holds other tokens, so dropout
        draws from the per-rank model-parallel RNG stream (as megatron's TransformerBlock)."""
        if self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _run_layers(self, ops: List[Op], h: Tensor, attention_mask, rotary_pos_emb) -> Tensor:
        layers = [self._layer(op) for op in ops]
        for begin, end, recompute in self._recompute_chunks(len(layers), ops[0].position):
            chunk = functools.partial(_apply_layers, layers[begin:end])
            if recompute:
                h = tensor_parallel.checkpoint(chunk, self.config.distribute_saved_activations,
                                               h, attention_mask, rotary_pos_emb)
            else:
                h = chunk(h, attention_mask, rotary_pos_emb)
        return h

    def _recompute_chunks(self, num_layers: int, start: int) -> List[Tuple[int, int, bool]]:
        """(begin, end, recompute) runs of ``num_layers`` consecutive layer applications, the
        first being application ``start`` of the unrolled graph. Full recompute, as
        megatron-core's TransformerBlock defines it but over layer *applications*: 'uniform'
        checkpoints every ``recompute_num_layers`` consecutive layers of a segment (prelude, one
        core application, coda; = one chunk per loop iteration when it equals the core size),
        'block' the first ``recompute_num_layers`` applications of the graph."""
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training or not torch.is_grad_enabled():
            return [(0, num_layers, False)]
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
        split = max(0, min(num_layers, n - start))
        return [run for run in ((0, split, True), (split, num_layers, False)) if run[0] < run[1]]

    def _check_num_loops(self, num_loops: int) -> int:
        trained = self.config.num_loops
        # per-step parameters (routers, coefficients, untied cores) exist for K steps only
        per_step = has_per_step_parameters(self.config.state_scheme)
        limit = trained if per_step or not self.config.parsed_layout.tied else None
        if num_loops < 0 or (limit is not None and num_loops > limit):
            allowed = f"0..{limit}" if limit is not None else ">= 0"
            raise ValueError(
                f"num_loops={num_loops} is out of range for layout={self.config.layout!r} with "
                f"state_scheme={self.config.state_scheme!r}: expected {allowed}"
            )
        return num_loops

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Each layer's own sharded state dict under its fixed key (``prelude.i``, ``cores.c.i``,
        ``coda.i``), whatever the parallel layout.

        MegatronModule's default would hand the ``nn.ModuleList``s to megatron-core's fallback,
        which treats every tensor as replicated across tensor-parallel ranks (wrong for the
        split QKV/FC1/FC2 weights) and skips TransformerLayer's key map (so local-spec
        checkpoints would not use the TransformerEngine names megatron-core checkpoints share).
        Weights several pipeline stages hold are saved by the first holder only; a layer
        computing with another chunk's weights (virtual pipelining) is left out.
        """
        out: ShardedStateDict = {}

        def visit(module: nn.Module, path: str) -> None:
            if getattr(module, TIED_COPY, False):  # saved with the chunk owning its weights
                return
            if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                for name, child in module.named_children():
                    visit(child, f"{path}{name}.")
                return
            # the explicit group gives replicated tensors (routers) a per-TP-rank replica id
            part = sharded_state_dict_default(module, path, sharded_offsets, metadata,
                                              tp_group=self.pg_collection.tp)
            mark_replica_ids(part, module)
            out.update(part)

        for name, child in self.named_children():
            visit(child, f"{prefix}{name}.")
        return out

    def embedding_scale(self) -> float:
        return math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else 1.0
