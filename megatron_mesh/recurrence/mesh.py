"""State passing between loop iterations: the heuristic schemes and the MeSH buffer.

Pure tensor math, no parallelism (paper Sec. 3.1-3.2, Algorithms 1 and 2 in Appendix C, and the
learnable combinations of Appendix E.2). Hidden states are [s, b, h]; routing weights are
[s, b, B] (softmax over the B slots, per token); the MeSH buffer is [B, s, b, h].

A scheme is driven by the block (``StateScheme``; input injection schemes are in injection.py,
the name -> class table in schemes.py):
    h0, state = scheme.begin(h_emb, h_pre)              # h_pre = prelude output
    u = scheme.inject(t, h, state)                      # the core's input at step t (here: h)
    h_next, state = scheme.step(t, u, f_core(u), state) # t = 0..K-1
    coda_input = scheme.end(h_K, state)                 # (here: h_K)

Precision (bf16 training; tests/recurrence/test_mesh_precision.py):
- Router logits come out of the router's Linear in the activation dtype; the softmax runs in
  fp32 and the weights are rounded once to the activation dtype (each weight within u = 2^-8
  relative of the fp32 value, so the B weights of a token sum to 1 within B*u).
- The buffer is held in the activation dtype (bf16) across its K+1 writes, like megatron-core's
  residual stream (fp32_residual_connection off): it *is* a residual stream, slot 0 the
  embedding highway. Every write and read computes in fp32 and rounds once per output element
  (here and in fused_mesh), so K+1 writes add at most K+1 roundings per slot, fewer than the
  N_compute residual additions of the layers between them. An fp32 buffer would double the
  (K+1)*B*[s, b, h] states saved for backward (1.4B 4+8R2+4, micro-batch 4 x 4096: 1.0 GB ->
  2.0 GB) and give the pipeline carry a second dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from megatron_mesh.recurrence.fused_mesh import CycleCompile, mesh_cycle

SUPPLEMENTS = ("residual", "anchor", "anchor_star")
"""What the additive schemes of Eq. 1 add to the core output: h(t), h(0) or h_emb."""

COMB_INIT = (1.0, 1.0, 1.0)
"""Initial (alpha_core, alpha_h0, alpha_emb) of the E.2 combinations. The paper does not give an
init; all ones starts both at the fixed '+anchor+anchor*' sum, the best heuristic of Table 4."""
LAYER_STACK = (1.0, 0.0, 0.0)
"""The E.2 coefficients of a loop step that is its core's layers alone: f_core(h), exactly."""

InitMethod = Callable[[Tensor], None]

CYCLE_IMPLEMENTATIONS = ("auto", "fused", "eager")
"""How MeshScheme runs a cycle (MeshConfig.cycle_impl): "auto" (fused_mesh.mesh_cycle on CUDA,
the eager buffer_write / buffer_read on CPU), "fused" or "eager" everywhere."""


@dataclass
class LoopState:
    """What a scheme carries from one loop step to the next (and across pipeline stages)."""

    h_emb: Tensor  # [s, b, h] scaled token embeddings
    h0: Optional[Tensor] = None  # [s, b, h] first loop state (anchor schemes)
    injected: Optional[Tensor] = None  # [s, b, h] what injection schemes feed every step (e)
    buffer: Optional[Tensor] = None  # [B, s, b, h] MeSH memory

    def where(self, keep: Tensor, other: "LoopState") -> "LoopState":
        """This state where ``keep`` ([s|1, b, 1] bool, broadcast over each field's trailing
        [s, b, h]) holds, ``other`` elsewhere: a loop step that some sequences or tokens sit
        out (per-sequence and per-token loop depth)."""
        def pick(new: Optional[Tensor], old: Optional[Tensor]) -> Optional[Tensor]:
            return new if new is old or new is None else torch.where(keep, new, old)

        return LoopState(**{name: pick(getattr(self, name), getattr(other, name))
                            for name in STATE_FIELDS})

    # How the state crosses a pipeline boundary (parallel/carry.py): as [s, b, h] slices of the
    # fields a scheme's steps read (``loop_state_fields``), the buffer one slice per slot.

    def slices(self, fields: Tuple[str, ...]) -> List[Tensor]:
        """The [s, b, h] slices of ``fields``, in order."""
        out: List[Tensor] = []
        for name in fields:
            value = getattr(self, name)
            out.extend(value.unbind(0) if name == "buffer" else [value])
        return out

    @staticmethod
    def slice_count(fields: Tuple[str, ...], buffer_slots: Optional[int]) -> int:
        return len(fields) + ((buffer_slots or 0) - 1 if "buffer" in fields else 0)

    @classmethod
    def from_slices(cls, fields: Tuple[str, ...], slices: Sequence[Tensor]) -> "LoopState":
        """The inverse of ``slices`` (fields not carried stay None)."""
        values = dict(zip(fields, slices))
        if "buffer" in fields:  # the last field: every slice from it on is a slot
            values["buffer"] = torch.stack(slices[fields.index("buffer"):], dim=0)  # [B, s, b, h]
        return cls(**{name: values.get(name) for name in STATE_FIELDS})


STATE_FIELDS = tuple(f.name for f in dataclasses.fields(LoopState))


@dataclass(frozen=True)
class SchemeOptions:
    """What building a scheme takes (from MeshConfig: block.py)."""

    hidden_size: int
    num_loops: int
    """K, the loop steps the layout trains with."""
    init_method: InitMethod
    """Initialiser of projection weights (megatron's normal(0, init_method_std))."""
    init_method_std: float = 0.02
    buffer_slots: int = 0
    """MeSH buffer length B."""
    cycle_impl: str = "auto"
    compile_options: CycleCompile = CycleCompile()
    initial_state: str = "zero"
    """Injection schemes: the loop's starting state, 'zero' or 'random' (truncated normal)."""
    initial_state_std: float = 0.0
    layernorm_epsilon: float = 1e-5
    normalization: str = "LayerNorm"
    """The layers' norm, 'LayerNorm' or 'RMSNorm': the one a scheme's own norm follows."""

    @classmethod
    def of(cls, config) -> "SchemeOptions":
        """The options of a model config (MeshConfig), read by field name: a new option is a
        field here named as the config's, nothing else. Two are not copied as they are: the
        config's ``cycle_compile_fallback`` becomes ``compile_options``, and its
        ``buffer_slots`` of None (a scheme without a buffer) is 0 here."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("compile_options", "buffer_slots")]
        return cls(**{name: getattr(config, name) for name in names},
                   buffer_slots=config.buffer_slots or 0,
                   compile_options=CycleCompile(fallback=config.cycle_compile_fallback))


class StateScheme(nn.Module):
    """Base class: the recurrence h(t+1) = rule(h(t), f_core(h(t)), history)."""

    names: ClassVar[Tuple[str, ...]] = ()
    """The ``state_scheme`` names this class implements."""
    per_step_parameters: ClassVar[bool] = False
    """Whether it holds parameters per loop step (routers, coefficients): then it runs the K
    steps it was built with, never another count."""
    carried: ClassVar[Tuple[str, ...]] = ()
    """The LoopState fields its steps read besides h(t) and the core output: what a pipeline
    boundary inside the loop carries for it (``buffer`` last: it is sent one slice per slot)."""

    @classmethod
    def build(cls, name: str, options: SchemeOptions) -> "StateScheme":
        return cls()

    @classmethod
    def carried_for(cls, name: str) -> Tuple[str, ...]:
        return cls.carried

    def begin(self, h_emb: Tensor, h_pre: Tensor) -> Tuple[Tensor, LoopState]:
        return h_pre, LoopState(h_emb=h_emb, h0=h_pre)

    def inject(self, t: int, h: Tensor, state: LoopState) -> Tensor:
        """The core's input at loop step t (input injection schemes mix in the prelude output)."""
        return h

    def step(self, t: int, h: Tensor, h_core: Tensor, state: LoopState) -> Tuple[Tensor, LoopState]:
        raise NotImplementedError

    def end(self, h: Tensor, state: Optional[LoopState]) -> Tensor:
        """What the coda reads after the last step (a function of h alone: depth lenses call it
        with state None)."""
        return h

    def metrics(self) -> Dict[str, Tensor]:
        """Scalars of the scheme's own parameters for the training log (``mesh/scheme/<name>``)."""
        return {}

    @torch.no_grad()
    def init_as_layer_stack(self) -> bool:
        """Set the parameters so that one loop step computes what the core's layers alone do:
        the coda reads f_core(h_pre), h_pre the prelude's output, exactly (retrofitting a
        pretrained model, hf/importer.py). Returns False where no setting does that."""
        return False

    def applied_matmul_weights(self, num_loops: int) -> int:
        """Matmul weights one token goes through in ``num_loops`` steps (stats.py counts FLOPs
        from it): here every weight once, as per-step routers and coefficients are."""
        return matmul_weights(self)

    def forward(self, t: int, h: Tensor, h_core: Tensor, state: LoopState) -> Tuple[Tensor, LoopState]:
        """``step`` through ``__call__``, so module hooks see the scheme's own parameters (e.g.
        static_comb's coefficients): megatron's DDP waits for a parameter's all-gather under
        overlap_param_gather in a forward pre-hook of the module holding it (parameters used by
        ``inject`` or ``end`` live in submodules, called through theirs)."""
        return self.step(t, h, h_core, state)


def matmul_weights(module: nn.Module) -> int:
    """Elements of the matrices ``module`` multiplies activations by: its 2-D parameters (not a
    LayerNorm's vectors; static_comb, whose [K, 3] scalars multiply nothing, counts none)."""
    return sum(p.numel() for p in module.parameters() if p.dim() == 2)


class AdditiveScheme(StateScheme):
    """Eq. 1: h(t+1) = f_core(h(t)) + sum of supplements (none: 'base'); supplements combine
    with '+', e.g. 'anchor+anchor_star'."""

    names = ("base", *SUPPLEMENTS)

    def __init__(self, supplements: Sequence[str] = ()):
        super().__init__()
        self.supplements = tuple(supplements)

    @classmethod
    def build(cls, name, options):
        return cls(() if name == "base" else name.split("+"))

    @classmethod
    def carried_for(cls, name):
        parts = name.split("+")
        return tuple(field for part, field in (("anchor", "h0"), ("anchor_star", "h_emb"))
                     if part in parts)

    def init_as_layer_stack(self):
        return not self.supplements  # 'base': h(t+1) = f_core(h(t)) at every step

    def step(self, t, h, h_core, state):
        sources = {"residual": h, "anchor": state.h0, "anchor_star": state.h_emb}
        for name in self.supplements:
            h_core = h_core + sources[name]
        return h_core, state


class Router(nn.Module):
    """Linear(h -> B) with bias, softmax over slots, per token (Eq. 3)."""

    def __init__(self, hidden_size: int, buffer_slots: int, init_method: InitMethod):
        super().__init__()
        self.linear = nn.Linear(hidden_size, buffer_slots, bias=True)
        init_method(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: Tensor) -> Tensor:
        logits = self.linear(h)  # [s, b, B]
        # softmax in fp32, one rounding to the activation dtype (module docstring: Precision)
        return torch.softmax(logits.float(), dim=-1).to(h.dtype)


class StepRouters(nn.Module):
    """The write and read router of one step t (t = -1 is the transitional pair)."""

    def __init__(self, hidden_size: int, buffer_slots: int, init_method: InitMethod):
        super().__init__()
        self.write = Router(hidden_size, buffer_slots, init_method)
        self.read = Router(hidden_size, buffer_slots, init_method)


def _fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def buffer_write(buffer: Tensor, h: Tensor, w_write: Tensor) -> Tensor:
    """Eq. 5: m_b <- m_b + h * w_write[b] for every slot b. [B,s,b,h], [s,b,h], [s,b,B].
    Computed in fp32, rounded once to the buffer's dtype."""
    acc = _fp32_or_wider(buffer.dtype)
    w = w_write.permute(2, 0, 1).unsqueeze(-1).to(acc)  # [B, s, b, 1]
    return (buffer.to(acc) + w * h.unsqueeze(0).to(acc)).to(buffer.dtype)


def buffer_read(buffer: Tensor, w_read: Tensor) -> Tensor:
    """h = sum_b m_b * w_read[b]. [B,s,b,h], [s,b,B] -> [s,b,h]. Summed in fp32, rounded once."""
    acc = _fp32_or_wider(buffer.dtype)
    w = w_read.permute(2, 0, 1).unsqueeze(-1).to(acc)  # [B, s, b, 1]
    return (buffer.to(acc) * w).sum(dim=0).to(buffer.dtype)


def initial_buffer(h_emb: Tensor, buffer_slots: int) -> Tensor:
    """Eq. 2: slot 0 holds h_emb, the other slots are zero. -> [B, s, b, h]."""
    zeros = h_emb.new_zeros((buffer_slots - 1, *h_emb.shape))
    return torch.cat([h_emb.unsqueeze(0), zeros], dim=0)


class MeshScheme(StateScheme):
    """Algorithm 2: a B-slot buffer with per-step write/read routers.

    ``routers[0]`` is the transitional pair (t = -1) applied to the prelude output;
    ``routers[t + 1]`` serves loop step t and reads h(t), the core's input.
    ``impl`` picks the cycle's implementation (CYCLE_IMPLEMENTATIONS); ``compile_options`` how
    the fused one compiles, and whether a compile failure stops the run or falls back to running
    uncompiled with a warning (same math, several more passes over the buffer per step: a
    throughput loss a large job should not take silently).
    """

    names = ("mesh",)
    per_step_parameters = True
    carried = ("buffer",)

    def __init__(self, hidden_size: int, num_loops: int, buffer_slots: int, init_method: InitMethod,
                 impl: str = "auto", compile_options: CycleCompile = CycleCompile()):
        super().__init__()
        self.buffer_slots = buffer_slots
        self.impl = impl
        self.compile_options = compile_options
        self.routers = nn.ModuleList(
            StepRouters(hidden_size, buffer_slots, init_method) for _ in range(num_loops + 1)
        )

    @classmethod
    def build(cls, name, options):
        return cls(options.hidden_size, options.num_loops, options.buffer_slots, options.init_method,
                   options.cycle_impl, options.compile_options)

    def _cycle(self, routers: StepRouters, route_from: Tensor, written: Tensor, buffer: Tensor):
        w_write, w_read = routers.write(route_from), routers.read(route_from)
        if self.impl == "fused" or (self.impl == "auto" and written.is_cuda):
            # same math, fewer memory passes
            return mesh_cycle(buffer, written, w_write, w_read, options=self.compile_options)
        buffer = buffer_write(buffer, written, w_write)
        return buffer_read(buffer, w_read), buffer

    def begin(self, h_emb, h_pre):
        buffer = initial_buffer(h_emb, self.buffer_slots)
        h0, buffer = self._cycle(self.routers[0], h_pre, h_pre, buffer)
        return h0, LoopState(h_emb=h_emb, h0=h0, buffer=buffer)

    def step(self, t, h, h_core, state):
        h_next, buffer = self._cycle(self.step_routers(t), h, h_core, state.buffer)
        return h_next, replace(state, buffer=buffer)

    def step_routers(self, t: int) -> StepRouters:
        """The pair loop step t routes with (``routers[0]`` is the transitional pair)."""
        return self.routers[t + 1]


class SharedRouterMeshScheme(MeshScheme):
    """MeSH with one router pair shared by every loop step (the transitional pair stays its
    own): no per-step parameters, so it trains with a sampled loop depth and runs any number of
    steps. An extension beyond the paper, whose routers are per step (Sec. 3.2)."""

    names = ("mesh_shared",)
    per_step_parameters = False

    def __init__(self, hidden_size: int, num_loops: int, buffer_slots: int, init_method: InitMethod,
                 impl: str = "auto", compile_options: CycleCompile = CycleCompile()):
        super().__init__(hidden_size, 1, buffer_slots, init_method, impl, compile_options)

    def step_routers(self, t: int) -> StepRouters:
        return self.routers[1]

    def applied_matmul_weights(self, num_loops: int) -> int:
        return matmul_weights(self.routers[0]) + num_loops * matmul_weights(self.routers[1])


class StaticCombScheme(StateScheme):
    """E.2 static combination: h(t+1) = a1 f_core(h) + a2 h(0) + a3 h_emb, scalars per step."""

    names = ("static_comb",)
    per_step_parameters = True
    carried = ("h0", "h_emb")

    def __init__(self, num_loops: int):
        super().__init__()
        self.coefficients = nn.Parameter(torch.tensor([COMB_INIT] * num_loops))  # [K, 3]

    @classmethod
    def build(cls, name, options):
        return cls(options.num_loops)

    def applied_matmul_weights(self, num_loops):
        return 0

    @torch.no_grad()
    def init_as_layer_stack(self):
        self.coefficients.copy_(torch.tensor([LAYER_STACK] * len(self.coefficients)))
        return True

    def step(self, t, h, h_core, state):
        a = self.coefficients[t].to(h_core.dtype)
        return a[0] * h_core + a[1] * state.h0 + a[2] * state.h_emb, state


class DynamicCombScheme(StateScheme):
    """E.2 dynamic combination: the three coefficients are Linear_t(h(t)) per token.

    The weights start at zero and the bias at COMB_INIT, so at init it equals the static scheme.
    """

    names = ("dynamic_comb",)
    per_step_parameters = True
    carried = ("h0", "h_emb")

    def __init__(self, hidden_size: int, num_loops: int):
        super().__init__()
        self.coefficient_proj = nn.ModuleList(nn.Linear(hidden_size, 3) for _ in range(num_loops))
        for proj in self.coefficient_proj:
            nn.init.zeros_(proj.weight)
            with torch.no_grad():
                proj.bias.copy_(torch.tensor(COMB_INIT))

    @classmethod
    def build(cls, name, options):
        return cls(options.hidden_size, options.num_loops)

    @torch.no_grad()
    def init_as_layer_stack(self):
        for proj in self.coefficient_proj:  # the static LAYER_STACK whatever h(t)
            proj.weight.zero_()
            proj.bias.copy_(torch.tensor(LAYER_STACK))
        return True

    def step(self, t, h, h_core, state):
        a = self.coefficient_proj[t](h).unsqueeze(-1)  # [s, b, 3, 1]
        return a[..., 0, :] * h_core + a[..., 1, :] * state.h0 + a[..., 2, :] * state.h_emb, state
