"""Input injection: the state schemes of the recurrent-depth models beside MeSH.

Pure tensor math, [s, b, h] like mesh.py. With e the prelude output and x(t) the loop state:

    x(0)   = 0, or truncated normal N(0, std^2) cut at +-3 std ("random", drawn every forward)
    u(t)   = inject(x(t), e)                      the core's input at step t
    x(t+1) = f_core(u(t))                         the core's output replaces the state
    coda input = readout(x(K))

with, from the sources (seal-rg/recurrent-pretraining recpre/raven_modeling_minimal.py;
sandyresearch/parcae parcae_lm/modules/injection.py, models/parcae/parcae.py):
- additive:  inject = x + e,                      readout = identity;
- linear (Huginn):   inject = W [x ; e], W: 2h -> h without bias, readout = the layers' norm
  (LayerNorm or RMSNorm; Huginn's ln_f, an RMSNorm, reads the last state before the coda);
- diagonal (Parcae): inject = exp(-dt A) * x + dt * (B e), A = exp(A_log), dt = softplus(dt_bias)
  per channel, B a full h x h matrix; A_log = 0 and dt_bias such that exp(-dt A) = sqrt(1/5) at
  init, B = I; readout = C x(K), C: h -> h without bias (Parcae's C), orthogonal at init.
Nothing here has per-step parameters, so these models run any number of loop steps.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_mesh.recurrence.mesh import InitMethod, LoopState, SchemeOptions, StateScheme, matmul_weights

INITIAL_STATES = ("zero", "random")
"""The injection schemes' x(0): zeros, or truncated normal (Huginn's and Parcae's 'like-init')."""

DIAGONAL_INIT_DECAY = math.sqrt(1 / 5)
"""exp(-dt A) per channel at init (Parcae's default, 'matches linear injection retention')."""


class AddInjection(nn.Module):
    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        return x + e


class LinearInjection(nn.Module):
    """u = W [x ; e] (state first, as Huginn's adapter), W: 2h -> h, no bias."""

    def __init__(self, hidden_size: int, init_method: InitMethod):
        super().__init__()
        self.adapter = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        init_method(self.adapter.weight)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        return self.adapter(torch.cat([x, e], dim=-1))  # [s, b, 2h] -> [s, b, h]


class DiagonalInjection(nn.Module):
    """u = exp(-dt A) * x + dt * (B e): a diagonal, stable (decay < 1) linear recurrence."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(hidden_size))  # A = exp(A_log) > 0
        dt = -math.log(DIAGONAL_INIT_DECAY)  # exp(-dt * 1) = decay
        self.dt_bias = nn.Parameter(torch.full((hidden_size,), math.log(math.expm1(dt))))
        self.B = nn.Parameter(torch.eye(hidden_size))

    def rates(self) -> Tuple[Tensor, Tensor]:
        """(decay exp(-dt A), dt), per channel, in fp32."""
        dt = F.softplus(self.dt_bias.float())
        return torch.exp(-dt * torch.exp(self.A_log.float())), dt

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        decay, dt = self.rates()
        injected = F.linear(e, self.B)  # [s, b, h]
        return (decay * x.float() + dt * injected.float()).to(x.dtype)

    @torch.no_grad()
    def spectral_radius(self) -> Tensor:
        """max_i exp(-dt_i A_i): how much of x(t) survives a step at most (< 1: a contraction,
        which is what keeps the recurrence stable at any depth; Parcae's get_spectral_norm)."""
        return self.rates()[0].max()


class InjectionScheme(StateScheme):
    """x(t+1) = f_core(inject(x(t), e)); the subclasses choose inject and readout."""

    carried = ("injected",)

    def __init__(self, injection: nn.Module, readout: nn.Module, initial_state: str = "zero",
                 initial_state_std: float = 0.0):
        super().__init__()
        if initial_state not in INITIAL_STATES:
            raise ValueError(f"initial_state={initial_state!r}: expected one of {list(INITIAL_STATES)}")
        self.injection, self.readout = injection, readout
        self.initial_state, self.initial_state_std = initial_state, initial_state_std

    def first_state(self, e: Tensor) -> Tensor:
        """x(0), shaped like e: drawn afresh on every forward when random (as both sources)."""
        if self.initial_state == "zero":
            return torch.zeros_like(e)
        std = self.initial_state_std
        x = torch.empty(e.shape, device=e.device, dtype=torch.float32)
        return nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std).to(e.dtype)

    def begin(self, h_emb, h_pre):
        return self.first_state(h_pre), LoopState(h_emb=h_emb, injected=h_pre)

    def inject(self, t, h, state):
        return self.injection(h, state.injected)

    def step(self, t, h, h_core, state):
        return h_core, state

    def end(self, h, state):
        return self.readout(h)

    def applied_matmul_weights(self, num_loops):
        return num_loops * matmul_weights(self.injection) + matmul_weights(self.readout)

class AdditiveInjectionScheme(InjectionScheme):
    names = ("additive_injection",)

    @classmethod
    def build(cls, name, options: SchemeOptions):
        return cls(AddInjection(), nn.Identity(), options.initial_state, options.initial_state_std)

    def init_as_layer_stack(self):
        return self.initial_state == "zero"  # the first core input is 0 + e = e, exactly


def layer_norm(options: SchemeOptions) -> nn.Module:
    """A norm over the hidden size of the layers' kind (Huginn's RMSNorm, GPT-NeoX's LayerNorm)."""
    norm = nn.RMSNorm if options.normalization == "RMSNorm" else nn.LayerNorm
    return norm(options.hidden_size, eps=options.layernorm_epsilon)


class LinearInjectionScheme(InjectionScheme):
    names = ("linear_injection",)

    @classmethod
    def build(cls, name, options: SchemeOptions):
        return cls(LinearInjection(options.hidden_size, options.init_method),
                   layer_norm(options),
                   options.initial_state, options.initial_state_std)


class DiagonalInjectionScheme(InjectionScheme):
    names = ("diagonal_injection",)

    @torch.no_grad()
    def metrics(self):
        decay, dt = self.injection.rates()
        return {"spectral_radius": decay.max(), "mean_decay": decay.mean(), "mean_dt": dt.mean()}

    @classmethod
    def build(cls, name, options: SchemeOptions):
        readout = nn.Linear(options.hidden_size, options.hidden_size, bias=False)
        # Parcae: orthogonal, scaled to the entry size of the model's other projections
        nn.init.orthogonal_(readout.weight, gain=options.init_method_std * math.sqrt(options.hidden_size))
        return cls(DiagonalInjection(options.hidden_size), readout, options.initial_state,
                   options.initial_state_std)


INJECTION_SCHEMES = (AdditiveInjectionScheme, LinearInjectionScheme, DiagonalInjectionScheme)
