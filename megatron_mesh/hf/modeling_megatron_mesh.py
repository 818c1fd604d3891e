"""Hugging Face model of a megatron-mesh Prelude-Recurrent-Coda transformer (MeSH and baselines).

Self-contained: torch + transformers only, copied into every export. The math equals
``megatron_mesh`` (paper Algorithms 1 and 2): layers of one family (config.layer_family:
'gpt_neox', parallel residual, LayerNorm, GELU MLP, biases, 25% rotary; or 'llama', sequential
residual, RMSNorm, SwiGLU, grouped-query attention, full rotary, optional q/k norms, q/k/v biases
and Llama-3 rotary scaling), embeddings x sqrt(d), a tied (or untied) core applied K times, an
output layer optionally tied to the input embeddings, and between steps the state scheme (base /
residual / anchor / anchor_star sums, MeSH buffer with per-step routers, the E.2 combinations, or
the input injection of Huginn / Parcae: megatron_mesh/recurrence/injection.py), each a class
named in the one table SCHEMES. The KV cache keeps one slot per (loop step, layer) application.

Adaptive exit (ExitPolicy, the forward's exit_policy or config.exit_policy): after every loop
step t the model reads out z(t) = final_norm(coda(end(h(t)))) and each token still looping
tests its criterion: the entropy of softmax(embed_out(z(t))), the KL divergence from the step
before, or Ouro's exit gate (the CDF of the gates' exit distribution reaching a threshold).
A token that exits stops: its state is frozen, its logits are those of its exit step, and
every later attention reads its last computed K/V in each core and coda layer (Huginn's
"latest" lookup); the loop stops once every token of the forward has exited. Two caches
(ExitLayout): 'per_step', a slot per (step, layer) application, readouts included, where an
exited token's later slots repeat its latest K/V, so a cached decode equals the full uncached
forward; 'latest', fixed memory, one slot per layer holding each token's final K/V, where a new
token sees the earlier ones at their final step (a forward reads its positions one at a time).
"""

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megatron_mesh import MegatronMeshConfig, parse_layout


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin, r: int):  # x [b, nh, s, hd], cos and sin [b, 1, s, r]
    """Rotary (rotate_half, non-interleaved) on the first r dims of each head, the rest as is."""
    return torch.cat((x[..., :r] * cos + rotate_half(x[..., :r]) * sin, x[..., r:]), dim=-1)


def llama3_scaled(inv_freq, factor: float, low_freq_factor=1.0, high_freq_factor=4.0, original=8192):
    """Llama-3's rotary scaling: transformers' _compute_llama3_parameters, megatron-core's
    RotaryEmbedding._apply_scaling (long wavelengths / factor, short ones kept, between them
    interpolated)."""
    low_freq_wavelen, high_freq_wavelen = original / low_freq_factor, original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    # The frequencies are recomputed per call rather than held in a non-persistent buffer:
    # transformers 5 builds models on the meta device and leaves such buffers uninitialised.
    def __init__(self, dim: int, base: float, scaling_factor: Optional[float] = None):
        super().__init__()
        self.dim, self.base, self.scaling_factor = dim, base, scaling_factor

    def forward(self, positions):  # [b, s] -> cos, sin [b, 1, s, dim]
        steps = torch.arange(0, self.dim, 2, device=positions.device).float()
        inv_freq = 1.0 / (self.base ** (steps / self.dim))
        if self.scaling_factor is not None:
            inv_freq = llama3_scaled(inv_freq, self.scaling_factor)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32 and cast back (HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # [..., dim]
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def family_norm(config: MegatronMeshConfig) -> nn.Module:
    """The layer family's norm over hidden_size: LayerNorm with bias (gpt_neox) or RMSNorm,
    weight only (llama)."""
    if config.layer_family == "llama":
        return RMSNorm(config.hidden_size, config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoXAttention(nn.Module):
    """Fused query_key_value laid out per head as [q, k, v], biases, partial rotary."""

    def __init__(self, config: MegatronMeshConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.rot = int(self.head_dim * config.rotary_pct)
        width = self.heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * width)
        self.dense = nn.Linear(width, config.hidden_size)

    def forward(self, x, cos, sin, mask, cache: Optional[Cache], slot: int):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # [b, nh, s, hd], per head [q, k, v]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # as megatron-core: rotate in the activation dtype
        q, k = apply_rotary(q, cos, sin, self.rot), apply_rotary(k, cos, sin, self.rot)
        if cache is not None:
            k, v = cache.update(k, v, slot)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class GPTNeoXLayer(nn.Module):
    """GPT-NeoX parallel residual: x + attn(ln1(x)) + mlp(ln2(x))."""

    def __init__(self, config: MegatronMeshConfig):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = nn.Sequential()
        self.mlp.dense_h_to_4h = nn.Linear(h, config.intermediate_size)
        self.mlp.act = ACT2FN[config.hidden_act]
        self.mlp.dense_4h_to_h = nn.Linear(config.intermediate_size, h)

    def forward(self, x, cos, sin, mask, cache, slot):
        attn = self.attention(self.input_layernorm(x), cos, sin, mask, cache, slot)
        return x + attn + self.mlp(self.post_attention_layernorm(x))


class LlamaAttention(nn.Module):
    """q, k, v projections (biases only with add_qkv_bias), grouped-query K/V (query head i reads
    K/V head i // (heads / kv_heads)), per-head q/k RMSNorm before rotary with qk_layernorm."""

    def __init__(self, config: MegatronMeshConfig):
        super().__init__()
        h, bias = config.hidden_size, config.add_qkv_bias
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.kv_channels
        self.rot = int(self.head_dim * config.rotary_pct)
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        if config.qk_layernorm:  # megatron-core's q_layernorm / k_layernorm
            self.q_norm = RMSNorm(self.head_dim, config.layer_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, cos, sin, mask, cache: Optional[Cache], slot: int):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)  # [b, nh, s, hd]
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)).transpose(1, 2)  # [b, nkv, s, hd]
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)  # [b, nkv, s, hd]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rotary(q, cos, sin, self.rot), apply_rotary(k, cos, sin, self.rot)
        if cache is not None:  # the cache holds the kv_heads, not their repeats
            k, v = cache.update(k, v, slot)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [b, nh, past+s, hd]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, nh, s, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LlamaMLP(nn.Module):
    """SwiGLU (with hidden_act 'silu'): down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, config: MegatronMeshConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):  # [b, s, h] -> [b, s, h]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """Llama sequential residual: h = x + attn(norm1(x)), then h + mlp(norm2(h)), RMSNorms."""

    def __init__(self, config: MegatronMeshConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache, slot):  # [b, s, h] -> [b, s, h]
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slot)
        return h + self.mlp(self.post_attention_layernorm(h))


LAYERS = {"gpt_neox": GPTNeoXLayer, "llama": LlamaLayer}
"""layer_family -> its layer class."""


class Router(nn.Module):
    def __init__(self, hidden: int, slots: int):
        super().__init__()
        self.linear = nn.Linear(hidden, slots)

    def forward(self, h):  # [b, s, h] -> [b, s, B]
        return torch.softmax(self.linear(h).float(), dim=-1).to(h.dtype)


class StepRouters(nn.Module):
    def __init__(self, hidden: int, slots: int):
        super().__init__()
        self.write, self.read = Router(hidden, slots), Router(hidden, slots)


class AddInjection(nn.Module):
    def forward(self, x, e):
        return x + e


class LinearInjection(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.adapter = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x, e):
        return self.adapter(torch.cat([x, e], dim=-1))


class DiagonalInjection(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(hidden))
        self.dt_bias = nn.Parameter(torch.zeros(hidden))
        self.B = nn.Parameter(torch.eye(hidden))

    def forward(self, x, e):
        dt = F.softplus(self.dt_bias.float())
        decay = torch.exp(-dt * torch.exp(self.A_log.float()))
        return (decay * x.float() + dt * F.linear(e, self.B).float()).to(x.dtype)


# State passing between loop steps, one class per family of megatron_mesh/recurrence/mesh.py
# and injection.py (their parameter names, so the exported state dict loads as it is); SCHEMES
# below maps every state_scheme name to its class. Per loop step the model calls
#   u = scheme.inject(h, state); h = scheme.step(t, u, f_core(u), state); after the last step
#   the coda reads scheme.end(h). ``state`` is a dict the scheme keeps its history in.


class Scheme(nn.Module):
    per_step_parameters = False  # True: holds parameters per loop step, so runs 0..K steps only

    def __init__(self, config: MegatronMeshConfig, loops: int):
        super().__init__()
        self.name = config.state_scheme

    def begin(self, h_emb, h_pre):
        """(h(0), state) from the embeddings and the prelude output."""
        return h_pre, {"h_emb": h_emb, "h0": h_pre}

    def inject(self, h, state):
        return h

    def step(self, t, h, h_core, state):
        raise NotImplementedError

    def end(self, h):
        return h


class Additive(Scheme):
    """Eq. 1: h(t+1) = f_core(h(t)) + the '+'-joined supplements (none: 'base')."""

    SOURCES = ("residual", "anchor", "anchor_star")  # h(t), h(0), h_emb

    def __init__(self, config, loops):
        super().__init__(config, loops)
        self.supplements = [] if self.name == "base" else self.name.split("+")
        unknown = [s for s in self.supplements if s not in self.SOURCES]
        if unknown:
            raise ValueError(f"state_scheme={self.name!r}: {unknown} is not one of {self.SOURCES}")

    def step(self, t, h, h_core, state):
        sources = {"residual": h, "anchor": state["h0"], "anchor_star": state["h_emb"]}
        for name in self.supplements:
            h_core = h_core + sources[name]
        return h_core


class Mesh(Scheme):
    """Algorithm 2: a B-slot buffer, slot 0 starting as h_emb; routers[0] is the transitional
    pair (t = -1), routers[t + 1] serves step t."""

    per_step_parameters = True

    def __init__(self, config, loops):
        super().__init__(config, loops)
        self.slots = config.buffer_slots or loops + 3
        h = config.hidden_size
        self.routers = nn.ModuleList(StepRouters(h, self.slots) for _ in range(self.pairs(loops)))

    def pairs(self, loops):
        return loops + 1

    def pair(self, t):
        return self.routers[t + 1]

    def _cycle(self, routers, route_from, written, buffer):  # buffer [B, b, s, h]
        # write and read computed in fp32 and rounded once to the buffer's dtype (bf16 exports
        # round where megatron-mesh does: megatron_mesh/recurrence/mesh.py, Precision)
        acc = torch.promote_types(buffer.dtype, torch.float32)
        w = routers.write(route_from).permute(2, 0, 1).unsqueeze(-1).to(acc)
        buffer = (buffer.to(acc) + w * written.unsqueeze(0).to(acc)).to(buffer.dtype)
        r = routers.read(route_from).permute(2, 0, 1).unsqueeze(-1).to(acc)
        return (buffer.to(acc) * r).sum(0).to(buffer.dtype), buffer

    def begin(self, h_emb, h_pre):
        buffer = torch.cat([h_emb.unsqueeze(0), h_emb.new_zeros((self.slots - 1, *h_emb.shape))])
        h0, buffer = self._cycle(self.routers[0], h_pre, h_pre, buffer)
        return h0, {"h_emb": h_emb, "h0": h0, "buffer": buffer}

    def step(self, t, h, h_core, state):
        h_next, state["buffer"] = self._cycle(self.pair(t), h, h_core, state["buffer"])
        return h_next


class SharedMesh(Mesh):
    """MeSH with one router pair for every loop step (routers[1]; routers[0] stays transitional)."""

    per_step_parameters = False

    def pairs(self, loops):
        return 2

    def pair(self, t):
        return self.routers[1]


class Combination(Scheme):
    """Appendix E.2: h(t+1) = a1 f_core(h(t)) + a2 h(0) + a3 h_emb, coefficients per step."""

    per_step_parameters = True

    def coefficients_at(self, t, h):  # [3] or [b, s, 3]
        raise NotImplementedError

    def step(self, t, h, h_core, state):
        a = self.coefficients_at(t, h).to(h_core.dtype)
        return a[..., 0:1] * h_core + a[..., 1:2] * state["h0"] + a[..., 2:3] * state["h_emb"]


class StaticComb(Combination):
    def __init__(self, config, loops):
        super().__init__(config, loops)
        self.coefficients = nn.Parameter(torch.ones(loops, 3))

    def coefficients_at(self, t, h):
        return self.coefficients[t]


class DynamicComb(Combination):
    def __init__(self, config, loops):
        super().__init__(config, loops)
        self.coefficient_proj = nn.ModuleList(nn.Linear(config.hidden_size, 3) for _ in range(loops))

    def coefficients_at(self, t, h):
        return self.coefficient_proj[t](h)


class Injection(Scheme):
    """Input injection (Huginn, Parcae): x(t+1) = f_core(inject(x(t), e)), e the prelude output,
    from x(0) zeros or truncated normal (drawn per forward); the coda reads readout(x(K))."""

    def __init__(self, config, loops, injection: nn.Module, readout: nn.Module):
        super().__init__(config, loops)
        self.initial_state, self.initial_state_std = config.initial_state, config.initial_state_std
        self.injection, self.readout = injection, readout

    def begin(self, h_emb, h_pre):
        x = torch.zeros(h_pre.shape, device=h_pre.device)
        if self.initial_state == "random":
            std = self.initial_state_std
            nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std)
        return x.to(h_pre.dtype), {"h_emb": h_emb, "injected": h_pre}

    def inject(self, h, state):
        return self.injection(h, state["injected"])

    def step(self, t, h, h_core, state):
        return h_core

    def end(self, h):
        return self.readout(h)


class AdditiveInjectionScheme(Injection):  # u = x + e
    def __init__(self, config, loops):
        super().__init__(config, loops, AddInjection(), nn.Identity())


class LinearInjectionScheme(Injection):  # Huginn: u = W [x ; e], then the family's norm reads x(K)
    def __init__(self, config, loops):
        h = config.hidden_size
        super().__init__(config, loops, LinearInjection(h), family_norm(config))


class DiagonalInjectionScheme(Injection):  # Parcae: u = exp(-dt A) x + dt B e, C reads it out
    def __init__(self, config, loops):
        h = config.hidden_size
        super().__init__(config, loops, DiagonalInjection(h), nn.Linear(h, h, bias=False))


SCHEMES = {
    "base": Additive, "residual": Additive, "anchor": Additive, "anchor_star": Additive,
    "mesh": Mesh, "mesh_shared": SharedMesh,
    "static_comb": StaticComb, "dynamic_comb": DynamicComb,
    "additive_injection": AdditiveInjectionScheme, "linear_injection": LinearInjectionScheme,
    "diagonal_injection": DiagonalInjectionScheme,
}
"""state_scheme -> its class: the one place a new scheme is added ('+'-sums of supplements,
e.g. 'anchor+anchor_star', are Additive; 'vanilla' has no loop and no scheme)."""


def build_scheme(config: MegatronMeshConfig, loops: int) -> Scheme:
    cls = SCHEMES.get(config.state_scheme.split("+")[0])
    if cls is None:
        raise ValueError(f"state_scheme={config.state_scheme!r}: this model code knows "
                         f"{sorted(SCHEMES)} (and '+'-sums of residual, anchor, anchor_star)")
    return cls(config, loops)


EXIT_CRITERIA = ("kl", "entropy", "gate")
EXIT_CACHES = ("per_step", "latest")


@dataclass
class ExitPolicy:
    """When a token stops looping at inference (module docstring): after step t >= min_steps
    it exits where its criterion is below ``threshold`` ('entropy' of p(t) = softmax(logits(t))
    in nats; 'kl', KL(p(t) || p(t-1)), from t = 2) or, for 'gate', where the exit gates' CDF
    sum_{j<=t} lambda(j) prod_{i<j} (1 - lambda(i)) reaches it (Ouro's rule; config.exit_gate);
    at max_steps (None: the trained K) every token exits. ``cache``: the KV cache layout
    (ExitLayout). ``record``: a list to which each forward appends its exit_steps [b, s], e.g.
    to see the steps per token of generate(), which returns only the tokens."""

    criterion: str
    threshold: float
    min_steps: int = 1
    max_steps: Optional[int] = None
    cache: str = "per_step"
    record: Optional[list] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self._expect("criterion", self.criterion in EXIT_CRITERIA, f"one of {EXIT_CRITERIA}")
        self._expect("cache", self.cache in EXIT_CACHES, f"one of {EXIT_CACHES}")
        number = isinstance(self.threshold, numbers.Real) and not isinstance(self.threshold, bool)
        self._expect("threshold", number and not math.isnan(self.threshold), "a number")
        self.threshold = float(self.threshold)
        if self.criterion == "gate":  # an exit CDF lies in [0, 1]; to never exit: min_steps = max_steps
            self._expect("threshold", 0.0 <= self.threshold <= 1.0, "0..1 for criterion 'gate'")
        self._expect("min_steps", _is_int(self.min_steps) and self.min_steps >= 1, "an int >= 1")
        if self.max_steps is not None:
            self._expect("max_steps", _is_int(self.max_steps) and self.max_steps >= self.min_steps,
                         f"None or an int >= min_steps={self.min_steps}")
        self._expect("record", self.record is None or hasattr(self.record, "append"), "None or a list")

    def _expect(self, name, ok, expected):
        if not ok:
            raise ValueError(f"ExitPolicy.{name}={getattr(self, name)!r}: expected {expected}")

    @classmethod
    def of(cls, obj) -> Optional["ExitPolicy"]:
        """An ExitPolicy from itself, a dict of its fields (config.json's exit_policy) or None."""
        if obj is None or isinstance(obj, ExitPolicy):
            return obj
        if not isinstance(obj, dict):
            raise ValueError(f"exit_policy: expected an ExitPolicy, a dict of its fields or None, "
                             f"got {type(obj).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(obj) - set(names))
        if unknown:
            raise ValueError(f"exit_policy: unknown field(s) {unknown}: expected some of {names}")
        return cls(**obj)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ExitGate(nn.Module):
    """Ouro's learned exit (megatron_mesh/recurrence/exit_gate.py): gates[t - 1] reads the
    readout z(t), the input of embed_out after step t, and gives lambda(t), the chance of
    exiting there (t = 1..K-1; after step K every token exits)."""

    def __init__(self, config: MegatronMeshConfig, loops: int):
        super().__init__()
        if loops < 2:
            raise ValueError(f"exit_gate=True: expected a recursive layout with K >= 2 loop steps to "
                             f"choose from, got K={loops} (layout={config.layout!r})")
        self.gates = nn.ModuleList(nn.Linear(config.hidden_size, 1) for _ in range(loops - 1))

    def forward(self, t: int, z):  # z [b, s, h] -> lambda(t) [b, s], float32
        return torch.sigmoid(self.gates[t - 1](z).float()).squeeze(-1)


class ExitTest:
    """One forward's exit criterion, fed the readout z(t) [b, s, h] of every step t = 1..steps:
    it keeps what the criterion needs of earlier steps (log p(t-1) for 'kl', the exit CDF for
    'gate') for this forward only, and computes logits only at steps that test them."""

    def __init__(self, policy: ExitPolicy, steps: int, lm_head, gate):
        self.policy, self.steps, self.lm_head, self.gate = policy, steps, lm_head, gate
        self.log_p = self.cdf = self.survival = None

    def exits(self, t: int, z):  # -> [b, s] bool: a token still looping exits after step t
        if t == self.steps:
            return torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
        passed = getattr(self, "_" + self.policy.criterion)(t, z)
        if passed is None or t < self.policy.min_steps:
            return torch.zeros(z.shape[:-1], dtype=torch.bool, device=z.device)
        return passed

    def _log_probs(self, z):  # [b, s, h] -> log p(t) [b, s, V], float32
        return F.log_softmax(self.lm_head(z).float(), dim=-1)

    def _entropy(self, t, z):
        if t < self.policy.min_steps:
            return None
        log_p = self._log_probs(z)
        return -(log_p.exp() * log_p).sum(-1) < self.policy.threshold

    def _kl(self, t, z):  # KL(p(t) || p(t-1)): none at step 1
        if t < self.policy.min_steps - 1:
            return None
        log_p, before = self._log_probs(z), self.log_p
        self.log_p = log_p
        if before is None:
            return None
        return (log_p.exp() * (log_p - before)).sum(-1) < self.policy.threshold

    def _gate(self, t, z):  # p(t) = lambda(t) prod_{i<t} (1 - lambda(i)); CDF(t) = sum_{j<=t} p(j)
        lam = self.gate(t, z)  # [b, s]
        survival = torch.ones_like(lam) if self.survival is None else self.survival
        self.cdf = lam * survival if self.cdf is None else self.cdf + lam * survival
        self.survival = survival * (1 - lam)
        return self.cdf >= self.policy.threshold


@dataclass(frozen=True)
class ExitLayout:
    """Where a forward with an exit policy keeps K/V in the cache (a DynamicCache's layers), with
    p prelude, c core (per step) and d coda layers and M = max_steps:
    'per_step': [prelude 0..p-1 | step 1: core 0..c-1, coda 0..d-1 | ... | step M: ...], p +
      M (c + d) slots, the coda's being step t's readout; every slot holds every token, an
      exited token's slots past its exit step its latest K/V (ExitKV.finish);
    'latest': [prelude | core 0..c-1 | coda 0..d-1], p + c + d slots whatever M: each token's
      final K/V, written once it exits (ExitKV keeps its step-t K/V until then). Not the fixed
      depth even where no token exits early: at step t a token sees the earlier ones at their
      final step, not at step t (Huginn's "latest" lookup)."""

    prelude: int
    core: int
    coda: int
    steps: int
    cache: str

    @property
    def size(self) -> int:
        per_step = self.steps if self.cache == "per_step" else 1
        return self.prelude + per_step * (self.core + self.coda)

    def slot(self, kind: str, layer: int, t: int) -> int:
        if kind == "prelude":
            return layer
        step = (t - 1) * (self.core + self.coda) if self.cache == "per_step" else 0
        return self.prelude + step + layer + (self.core if kind == "coda" else 0)


def _cached(cache, index: int):
    """(keys, values) [b, nkv, past, hd] of a DynamicCache's slot, or None while it holds none."""
    layers = cache.layers
    if index >= len(layers) or not layers[index].get_seq_length():
        return None
    return layers[index].keys, layers[index].values


class ExitKV:
    """Stands in for the Cache in the attention of one forward with an exit policy: the layers
    call update(k, v, (kind, layer)). A token that exited before the current step gets its last
    computed K/V instead of new ones (kept here per core and coda layer for the tokens of this
    forward); the cache below, if any, holds the earlier tokens as ExitLayout says."""

    def __init__(self, cache: Optional[Cache], layout: ExitLayout):
        self.cache, self.layout = cache, layout
        self.step, self.active = 1, None
        self.latest = {}  # (kind, layer) -> (k, v) [b, nkv, s, hd]

    def at(self, step: int, active):  # active [b, s]: the tokens that compute this step
        self.step, self.active = step, active

    def update(self, k, v, slot):  # k, v [b, nkv, s, hd] -> what the queries attend to
        kind, layer = slot
        if kind == "prelude":
            return (k, v) if self.cache is None else self.cache.update(k, v, layer)
        if slot in self.latest:
            keep = self.active[:, None, :, None]
            k, v = torch.where(keep, k, self.latest[slot][0]), torch.where(keep, v, self.latest[slot][1])
        self.latest[slot] = (k, v)
        if self.cache is None:
            return k, v
        index = self.layout.slot(kind, layer, self.step)
        if self.layout.cache == "per_step":
            return self.cache.update(k, v, index)
        past = _cached(self.cache, index)  # 'latest': the earlier tokens' final K/V, then this step's
        return (k, v) if past is None else (torch.cat([past[0], k], -2), torch.cat([past[1], v], -2))

    def finish(self, last_step: int) -> None:
        """After the loop: 'per_step' repeats the latest K/V in the slots of the steps not run;
        'latest' writes each token's final K/V."""
        if self.cache is None:
            return
        steps = range(last_step + 1, self.layout.steps + 1) if self.layout.cache == "per_step" else [1]
        for t in steps:
            for (kind, layer), (k, v) in self.latest.items():
                self.cache.update(k, v, self.layout.slot(kind, layer, t))


class MegatronMeshPreTrainedModel(PreTrainedModel):
    config_class = MegatronMeshConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["GPTNeoXLayer", "LlamaLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class MegatronMeshModel(MegatronMeshPreTrainedModel):
    def __init__(self, config: MegatronMeshConfig):
        super().__init__(config)
        prelude, core, coda, tied = parse_layout(config.layout)
        self.loops, self.tied = len(core), tied
        layer = LAYERS[config.layer_family]
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList(layer(config) for _ in range(prelude))
        cores = core[:1] if tied and core else core
        self.cores = nn.ModuleList(nn.ModuleList(layer(config) for _ in range(n)) for n in cores)
        self.coda = nn.ModuleList(layer(config) for _ in range(coda))
        self.scheme = build_scheme(config, self.loops) if self.loops else None
        self.exit_gate = ExitGate(config, self.loops) if getattr(config, "exit_gate", False) else None
        self.final_layer_norm = family_norm(config)
        self.rotary = Rotary(int(config.kv_channels * config.rotary_pct), config.rotary_emb_base,
                             config.rope_scaling_factor)
        self.gradient_checkpointing = False
        self.post_init()
        if getattr(config, "exit_policy", None) is not None:  # a bad one fails at load
            self._exit_steps(ExitPolicy.of(config.exit_policy))

    def applications(self, loops=None, policy: Optional[ExitPolicy] = None) -> int:
        """KV cache slots of a forward with ``loops`` loop steps: one per layer application, or
        with an exit ``policy`` (``loops`` its max_steps) its ExitLayout's."""
        loops = self.loops if loops is None else loops
        if policy is not None:
            return self.exit_layout(policy, loops).size
        core = sum(len(self.cores[0 if self.tied else t]) for t in range(loops))
        return len(self.prelude) + core + len(self.coda)

    def _bounded(self) -> bool:
        """Whether the loop runs at most the trained K steps: per-step parameters or untied cores."""
        return self.scheme is not None and self.scheme.per_step_parameters or not self.tied

    def depth(self, num_loops=None, exit_policy=None):
        """(loop steps, ExitPolicy or None) of a forward: its num_loops or its exit_policy (not
        both), else the config's; the steps are the fixed depth or the policy's max_steps."""
        if num_loops is not None and exit_policy is not None:
            raise ValueError(f"num_loops={num_loops} and exit_policy={exit_policy}: pass one "
                             f"(a fixed depth or an adaptive exit)")
        if num_loops is None and exit_policy is None:
            num_loops, exit_policy = self.config.num_loops, getattr(self.config, "exit_policy", None)
        policy = ExitPolicy.of(exit_policy)
        if policy is not None:
            return self._exit_steps(policy), policy
        loops = self.loops if num_loops is None else num_loops
        if self._bounded() and not 0 <= loops <= self.loops:
            raise ValueError(f"num_loops={loops}: expected 0..{self.loops} for this layout and scheme")
        return loops, None

    def _exit_steps(self, policy: ExitPolicy) -> int:
        """The policy's max_steps for this model, after checking that the model can run it."""
        if self.scheme is None:
            raise ValueError(f"exit_policy: expected a recursive layout, got layout={self.config.layout!r} "
                             f"(no loop to exit from)")
        if policy.criterion == "gate" and self.exit_gate is None:
            raise ValueError("ExitPolicy.criterion='gate': expected a model with exit gates "
                             "(config.exit_gate=True), got exit_gate=False")
        steps = self.loops if policy.max_steps is None else policy.max_steps
        if steps > self.loops and (self._bounded() or policy.criterion == "gate"):
            why = "K - 1 exit gates" if policy.criterion == "gate" else "per-step parameters or untied cores"
            raise ValueError(f"ExitPolicy.max_steps={steps}: expected 1..{self.loops} for this layout "
                             f"and scheme ({why})")
        if policy.min_steps > steps:
            raise ValueError(f"ExitPolicy.min_steps={policy.min_steps}: expected <= max_steps={steps}"
                             f"{' (None: the trained K)' if policy.max_steps is None else ''}")
        if len({len(core) for core in self.cores}) > 1:
            raise ValueError(f"exit_policy: expected as many core layers at every loop step, got "
                             f"layout={self.config.layout!r}")
        return steps

    def exit_layout(self, policy: ExitPolicy, steps: int) -> ExitLayout:
        return ExitLayout(len(self.prelude), len(self.cores[0]), len(self.coda), steps, policy.cache)

    def _run(self, layers, h, ctx, slots: List[int]):
        for layer in layers:
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(layer.__call__, h, *ctx[:3], None, 0)
            else:
                h = layer(h, *ctx, slots[0])
            slots[0] += 1
        return h

    def _embed(self, input_ids):  # [b, s] -> [b, s, h]
        scale = math.sqrt(self.config.hidden_size) if self.config.scale_embeddings else 1.0
        return self.embed_in(input_ids) * scale

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, num_loops=None, output_hidden_states=False, exit_policy=None,
                lm_head=None):
        """(final-normed hidden states [b, s, h], the hidden states of every stage or None,
        exit_steps [b, s] or None). With an exit policy (exit_policy, else config.exit_policy)
        the hidden states are each token's readout at its exit step, and the criteria 'kl' and
        'entropy' need ``lm_head`` (MegatronMeshForCausalLM passes its embed_out)."""
        loops, policy = self.depth(num_loops, exit_policy)
        if policy is not None:
            cache = past_key_values if use_cache else None
            return self._adaptive(input_ids, attention_mask, position_ids, cache, policy, loops, lm_head,
                                  output_hidden_states)
        b, s = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = self._positions(position_ids, input_ids, past)
        cos, sin = self.rotary(position_ids)
        mask = self._mask(attention_mask, b, s, past, input_ids.device)
        ctx = (cos, sin, mask, past_key_values if use_cache else None)
        h_emb = self._embed(input_ids)  # [b, s, h]
        states, slot = [h_emb], [0]
        h = self._run(self.prelude, h_emb, ctx, slot)
        states.append(h)
        if self.scheme is not None:
            h, loop_state = self.scheme.begin(h_emb, h)
            states.append(h)
            for t in range(loops):
                core = self.cores[0 if self.tied else t]
                u = self.scheme.inject(h, loop_state)
                h = self.scheme.step(t, u, self._run(core, u, ctx, slot), loop_state)
                states.append(h)
            h = self.scheme.end(h)
        h = self._run(self.coda, h, ctx, slot)
        states.append(h)
        return self.final_layer_norm(h), (tuple(states) if output_hidden_states else None), None

    def _adaptive(self, input_ids, attention_mask, position_ids, cache, policy, steps, lm_head, want_states):
        """The forward with an exit policy; each forward's exit_steps go to policy.record."""
        if policy.criterion != "gate" and lm_head is None:
            raise ValueError(f"ExitPolicy.criterion={policy.criterion!r}: expected lm_head (the output "
                             f"layer) to compute its logits, got None")
        run = (self._exit_forward, self._exit_one_by_one)[policy.cache == "latest"]
        h, states, exit_steps = run(input_ids, attention_mask, position_ids, cache, policy,
                                    self.exit_layout(policy, steps), lm_head, want_states)
        if policy.record is not None:
            policy.record.append(exit_steps)
        return h, states, exit_steps

    def _exit_one_by_one(self, input_ids, attention_mask, position_ids, cache, policy, layout, lm_head,
                         want_states):
        """'latest': a token's final K/V exist only once it has exited, so the positions of a
        forward run one at a time, each against the cache of those before (a DynamicCache of
        this forward's own when uncached)."""
        cache = DynamicCache() if cache is None else cache
        b, s = input_ids.shape
        past = cache.get_seq_length()
        position_ids = self._positions(position_ids, input_ids, past)
        runs = [self._exit_forward(input_ids[:, i:i + 1],
                                   None if attention_mask is None else attention_mask[:, :past + i + 1],
                                   position_ids[:, i:i + 1], cache, policy, layout, lm_head, want_states)
                for i in range(s)]
        h, states, exit_steps = zip(*runs)
        states = tuple(torch.cat(stage, 1) for stage in zip(*states)) if want_states else None
        return torch.cat(h, 1), states, torch.cat(exit_steps, 1)

    def _exit_forward(self, input_ids, attention_mask, position_ids, cache, policy, layout, lm_head,
                      want_states):
        """Prelude, then loop steps with a readout after each until every token has exited."""
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = self._positions(position_ids, input_ids, past)
        cos, sin = self.rotary(position_ids)
        kv = ExitKV(cache, layout)
        ctx = (cos, sin, self._mask(attention_mask, b, s, past, input_ids.device), kv)
        h_emb = self._embed(input_ids)  # [b, s, h]
        h = self._keyed(self.prelude, h_emb, ctx, "prelude")
        states = [h_emb, h]
        h, loop_state = self.scheme.begin(h_emb, h)
        states.append(h)
        padding = torch.zeros_like(input_ids, dtype=torch.bool) if attention_mask is None else \
            attention_mask[:, -s:] == 0  # [b, s]: exits after step 1 (nothing attends to it)
        test = ExitTest(policy, layout.steps, lm_head, self.exit_gate)
        z, exit_steps = self._exit_loop(h, loop_state, ctx, test, padding, states)
        states.append(z)
        return z, (tuple(states) if want_states else None), exit_steps

    def _exit_loop(self, h, loop_state, ctx, test: ExitTest, padding, states: list):
        """Steps t = 1..M, each read out as z(t); a token exits where test says (or is padding),
        keeping z(t) and t; states gets h(t), frozen once exited, for every step."""
        kv, active = ctx[3], torch.ones_like(padding)  # [b, s]
        z_exit, exit_steps = None, torch.zeros(padding.shape, dtype=torch.long, device=padding.device)
        for t in range(1, test.steps + 1):
            kv.at(t, active)
            h = self._frozen_step(t, h, loop_state, ctx, active)
            states.append(h)
            z = self.final_layer_norm(self._keyed(self.coda, self.scheme.end(h), ctx, "coda"))  # [b, s, h]
            leaving = active & (test.exits(t, z) | padding)
            z_exit = z if z_exit is None else torch.where(leaving[..., None], z, z_exit)
            exit_steps = exit_steps.masked_fill(leaving, t)
            active = active & ~leaving
            if not active.any():
                break
        kv.finish(t)
        states.extend([h] * (test.steps - t))
        return z_exit, exit_steps

    def _frozen_step(self, t: int, h, loop_state: dict, ctx, active):  # h [b, s, h], active [b, s]
        """Loop step t (1-based) for the active tokens: the others keep h and the scheme state."""
        core = self.cores[0 if self.tied else t - 1]
        before = dict(loop_state)
        u = self.scheme.inject(h, loop_state)
        h_next = self.scheme.step(t - 1, u, self._keyed(core, u, ctx, "core"), loop_state)
        keep = active[..., None]  # [b, s, 1], also against the MeSH buffer [B, b, s, h]
        for name, value in loop_state.items():
            if value is not before[name]:
                loop_state[name] = torch.where(keep, value, before[name])
        return torch.where(keep, h_next, h)

    @staticmethod
    def _keyed(layers, h, ctx, kind: str):
        """The layers in turn, each passing ExitKV its (kind, index)."""
        for index, layer in enumerate(layers):
            h = layer(h, *ctx, (kind, index))
        return h

    @staticmethod
    def _positions(position_ids, input_ids, past: int):
        """The given position_ids, else past .. past + s - 1 for every row: [b, s]."""
        if position_ids is not None:
            return position_ids
        b, s = input_ids.shape
        return torch.arange(past, past + s, device=input_ids.device).expand(b, s)

    @staticmethod
    def _mask(attention_mask, b, s, past, device):
        """Boolean [b, 1, s, past+s]: causal, and padding from a 2D attention_mask."""
        if attention_mask is None and s == 1:
            return None  # one new token attends to everything cached
        causal = torch.ones(s, past + s, dtype=torch.bool, device=device).tril(past)[None, None]
        if attention_mask is not None:
            causal = causal & attention_mask[:, None, None, -(past + s):].bool()
        return causal.expand(b, 1, s, past + s)


def _grow_cache(cache, slots: int) -> None:
    """One KV slot per layer application: generate() sizes its cache for the trained depth
    (config.num_hidden_layers); a deeper num_loops, or an exit policy's 'per_step' layout (a
    slot per step for the readout's coda too), needs more slots of the same kind."""
    layers = getattr(cache, "layers", None)
    if layers and len(layers) < slots:
        layers.extend(type(layers[0])() for _ in range(slots - len(layers)))


@dataclass
class MeshCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast with exit_steps [b, s], the loop steps each token ran (None
    without an exit policy)."""

    exit_steps: Optional[torch.LongTensor] = None


class MegatronMeshForCausalLM(MegatronMeshPreTrainedModel, GenerationMixin):
    # Tied (config.tie_word_embeddings) output layer = the input table. transformers 5 reads
    # this {target: source} and ties only when the config says so; 4.x ties through
    # get_output_embeddings and reads the keys here as the names a save may drop as duplicates.
    _tied_weights_keys = {"embed_out.weight": "model.embed_in.weight"}

    def __init__(self, config: MegatronMeshConfig):
        super().__init__(config)
        self.model = MegatronMeshModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_in

    def get_output_embeddings(self):
        return self.embed_out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, labels=None, output_hidden_states=None, return_dict=True,
                num_loops=None, exit_policy=None, **kwargs):
        """exit_policy: an ExitPolicy or a dict of its fields (generate() passes it on), else
        config.exit_policy; not with num_loops. The output's exit_steps: steps per token."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        loops, policy = self.model.depth(num_loops, exit_policy)
        if use_cache:
            _grow_cache(past_key_values, self.model.applications(loops, policy))
        h, states, exit_steps = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                           use_cache, None if policy else loops,
                                           bool(output_hidden_states), policy, self.embed_out)
        logits = self.embed_out(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return MeshCausalLMOutput(loss=loss, logits=logits,
                                  past_key_values=past_key_values if use_cache else None,
                                  hidden_states=states, exit_steps=exit_steps)
