"""RecursiveMeshTransformerBlock: prelude -> loop(core, state scheme) -> coda -> final norm.

The core's layers exist once (tied layouts) and are applied K times; untied layouts
(``4+8+8+4``) build one core per loop step. Between loop steps the state scheme of
``megatron_mesh.mesh`` decides h(t+1) (for MeSH: the buffer write/read of Algorithm 2).
"""

from __future__ import annotations

import contextlib
import functools
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

from megatron_mesh.config import MeshConfig, refuse_unsupported
from megatron_mesh.layers import RecursiveBlockSubmodules, default_block_spec
from megatron_mesh.mesh import build_scheme

StateList = Optional[List[Tuple[str, Tensor]]]


def _refuse_unsupported(config: MeshConfig) -> None:
    """Settings megatron-core accepts but this block does not implement yet: fail loudly."""
    unsupported = {
        "pipeline_model_parallel_size": (config.pipeline_model_parallel_size, 1),
        "virtual_pipeline_model_parallel_size": (config.virtual_pipeline_model_parallel_size, None),
        "context_parallel_size": (config.context_parallel_size, 1),
    }
    refuse_unsupported(unsupported, "RecursiveMeshTransformerBlock yet")


def _mark_sequence_parallel(scheme: Optional[nn.Module], sequence_parallel: bool) -> None:
    """Routers and combination weights are replicated over tensor-parallel ranks. Under sequence
    parallelism each rank feeds them its own tokens, so their gradients are partial sums:
    megatron-core all-reduces the gradients of parameters flagged ``sequence_parallel`` over the
    tensor-parallel group (distributed/finalize_model_grads.py), as for its layer norms."""
    for param in scheme.parameters() if scheme is not None else ():
        setattr(param, "sequence_parallel", sequence_parallel)


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


class RecursiveMeshTransformerBlock(MegatronModule):
    """The transformer stack of a Prelude-Recurrent-Coda model. Input and output are [s, b, h]."""

    def __init__(
        self,
        config: MeshConfig,
        spec: Optional[RecursiveBlockSubmodules] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        _refuse_unsupported(config)
        spec = spec or default_block_spec()
        self.pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        layout = config.parsed_layout
        numbers = iter(range(1, layout.unique_layers + 1))

        def stack(num_layers: int) -> nn.ModuleList:
            # each layer that owns weights gets its own layer_number (1-based, unique)
            return nn.ModuleList(
                build_module(
                    spec.layer,
                    config=config,
                    layer_number=next(numbers),
                    add_layer_offset=False,
                    pg_collection=self.pg_collection,
                )
                for _ in range(num_layers)
            )

        self.prelude = stack(layout.prelude)
        self.cores = nn.ModuleList(stack(n) for n in layout.core_modules)
        self.coda = stack(layout.coda)
        with _param_device(config):
            self.scheme = build_scheme(
                config.state_scheme,
                config.hidden_size,
                layout.num_loops,
                config.buffer_slots or 0,
                config.init_method,
            )
        _mark_sequence_parallel(self.scheme, config.sequence_parallel)
        self.final_layernorm = build_module(
            spec.final_layernorm,
            config=config,
            hidden_size=config.hidden_size,
            eps=config.layernorm_epsilon,
        )

    @property
    def layers(self) -> List[nn.Module]:
        """Every layer that owns weights, once, in order (megatron-core code that walks
        ``decoder.layers``, e.g. schedules' set_current_microbatch, sees each layer once)."""
        return [*self.prelude, *(layer for core in self.cores for layer in core), *self.coda]

    def core_for_step(self, t: int) -> nn.ModuleList:
        return self.cores[0] if self.config.parsed_layout.tied else self.cores[t]

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Tensor] = None,
        num_loops: Optional[int] = None,
        states: StateList = None,
    ) -> Tensor:
        """Run the unrolled graph on the (scaled) embeddings ``hidden_states`` [s, b, h].

        ``num_loops`` reads out after fewer (or, for tied cores, more) loop steps than the layout
        trains with. ``states``, if a list, receives (name, tensor) for h_emb, the prelude output,
        every loop state h(t) and the coda output, for probes and tests.
        """
        K = self.config.num_loops if num_loops is None else self._check_num_loops(num_loops)
        applied = 0  # layer applications so far in the unrolled graph (for recompute 'block')

        def run(layers: nn.ModuleList, h: Tensor) -> Tensor:
            nonlocal applied
            for begin, end, recompute in self._recompute_chunks(len(layers), applied):
                chunk = functools.partial(_apply_layers, layers[begin:end])
                if recompute:
                    h = tensor_parallel.checkpoint(chunk, self.config.distribute_saved_activations,
                                                   h, attention_mask, rotary_pos_emb)
                else:
                    h = chunk(h, attention_mask, rotary_pos_emb)
            applied += len(layers)
            return h

        def record(name: str, h: Tensor) -> None:
            if states is not None:
                states.append((name, h))

        h_emb = hidden_states
        record("h_emb", h_emb)
        h = run(self.prelude, h_emb)
        record("prelude", h)
        if self.scheme is not None:
            h, loop_state = self.scheme.begin(h_emb, h)
            record("h0", h)
            for t in range(K):
                h_core = run(self.core_for_step(t), h)
                h, loop_state = self.scheme.step(t, h, h_core, loop_state)
                record(f"h{t + 1}", h)
        h = run(self.coda, h)
        record("coda", h)
        h = self.final_layernorm(h)
        return make_viewless_tensor(h, requires_grad=h.requires_grad, keep_graph=True)

    def _recompute_chunks(self, num_layers: int, start: int) -> List[Tuple[int, int, bool]]:
        """(begin, end, recompute) runs of a segment of ``num_layers`` layers whose first layer
        is application ``start`` of the unrolled graph. Full recompute, as megatron-core's
        TransformerBlock defines it but over layer *applications*: 'uniform' checkpoints every
        ``recompute_num_layers`` consecutive layers of a segment (prelude, one core application,
        coda; = one chunk per loop iteration when it equals the core size), 'block' the first
        ``recompute_num_layers`` applications of the graph."""
        cfg = self.config
        if cfg.recompute_granularity != "full" or not self.training:
            return [(0, num_layers, False)]
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]
        split = max(0, min(num_layers, n - start))
        return [run for run in ((0, split, True), (split, num_layers, False)) if run[0] < run[1]]

    def _check_num_loops(self, num_loops: int) -> int:
        trained = self.config.num_loops
        # per-step parameters (routers, coefficients, untied cores) exist for K steps only
        per_step = self.config.state_scheme in ("mesh", "static_comb", "dynamic_comb")
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
        """
        out: ShardedStateDict = {}

        def visit(module: nn.Module, path: str) -> None:
            if isinstance(module, nn.ModuleList):
                for i, child in enumerate(module):
                    visit(child, f"{path}{i}.")
            else:
                # the explicit group gives replicated tensors (routers) a per-TP-rank replica id
                out.update(sharded_state_dict_default(module, path, sharded_offsets, metadata,
                                                      tp_group=self.pg_collection.tp))

        for name, child in self.named_children():
            visit(child, f"{prefix}{name}.")
        return out

    def embedding_scale(self) -> float:
        return math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else 1.0
