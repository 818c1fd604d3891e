"""What the MeSH routers do: routing weights, entropies, slot usage and Eq. 7's coefficients.

The block does not hand out its routing weights, and it need not: each step's routers are plain
functions of states the forward pass records (``forward(states=[...])``), exactly as
``megatron_mesh.recurrence.mesh.MeshScheme`` calls them: the transitional pair ``routers[0]`` routes the
prelude output and writes it; the pair ``routers[t + 1]`` of loop step t routes h(t) and writes
f_core(h(t)) (recorded as ``core{t}``). Recomputing them here keeps mesh.py free of probe code;
``tests/probing/test_routers.py`` checks the result against the model's own h(t + 1).

**Effective coefficients (paper Eq. 7, App. D).** Slot 0 starts as h_emb and every write adds
``w_write^(j)[b] * x_j`` to slot b, where the written sources are x_prelude (step j = -1) and
x_core_j = f_core(h(j)) (j = 0..K-1). After the write of step t the buffer is

    m_b = [b == 0] h_emb + sum_{j=-1..t} w_write^(j)[b] x_j,

so the read of step t unrolls to

    h(t+1) = c_emb h_emb + sum_{j=-1..t} c_j x_j,   c_emb = w_read^(t)[0],
                                                     c_j   = sum_b w_read^(t)[b] w_write^(j)[b],

per token (h(0) for the transitional read t = -1). The paper's Eq. 7 writes the same sum without
the prelude term; here the prelude output is the source j = -1 ('prelude').

Weights are [s, b, B] (softmax over the B slots, per token), hidden states [s, b, h].
"""

from __future__ import annotations

import itertools

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from megatron_mesh.model.block import Recorded

HISTOGRAM_BINS = 10
"""Bins of the weight histograms over [0, 1] (a softmax weight never leaves that range)."""

States = Union[Mapping[str, Tensor], Sequence[Tuple[str, Tensor]]]


@dataclass
class StepRouting:
    """The write and read weights of one step: t = -1 is the transitional step (writes the
    prelude output, reads h(0)); t = 0..K-1 writes f_core(h(t)) and reads h(t+1)."""

    step: int
    write: Tensor  # [s, b, B]
    read: Tensor  # [s, b, B]


def step_label(step: int) -> str:
    return "transition" if step < 0 else f"step{step}"


def source_names(step: int) -> List[str]:
    """The terms of h(step + 1) in Eq. 7 order: 'emb', 'prelude', 'core0' .. f'core{step}'."""
    return ["emb", "prelude", *(Recorded.core_output(j) for j in range(step + 1))]


def state_dict_of(states: States) -> Dict[str, Tensor]:
    """The block's recorded ``[(name, tensor), ...]`` list (or an existing mapping) as a dict."""
    return dict(states.items() if isinstance(states, Mapping) else states)


def block_scheme(model) -> Optional[torch.nn.Module]:
    """The state scheme inside a (possibly DDP/Float16Module-wrapped) MeshGPTModel, else None."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return getattr(getattr(model, "decoder", None), "scheme", None)


def mesh_scheme(model) -> Optional[torch.nn.Module]:
    """The MeshScheme inside a (possibly wrapped) MeshGPTModel, else None."""
    from megatron_mesh.recurrence.mesh import MeshScheme

    scheme = block_scheme(model)
    return scheme if isinstance(scheme, MeshScheme) else None


# ---------------------------------------------------------------------------------------------
# routing weights and their unrolling


@torch.no_grad()
def routing_weights(scheme, states: States) -> List[StepRouting]:
    """Every step's (write, read) weights, recomputed from the recorded states as MeshScheme
    computes them (module docstring), without an autograd graph. Steps whose input was not
    recorded (a pipeline stage that does not hold them) are left out."""
    recorded = state_dict_of(states)
    inputs = [(-1, recorded.get(Recorded.PRELUDE))]
    inputs += [(t, recorded.get(Recorded.loop_state(t))) for t in range(_steps_run(scheme, recorded))]
    out = []
    for step, h in inputs:
        if h is None:
            break
        routers = scheme.step_routers(step)
        out.append(StepRouting(step, routers.write(h), routers.read(h)))
    return out


def _steps_run(scheme, recorded: Dict[str, Tensor]) -> int:
    """Loop steps the routing covers: K for per-step routers; for shared routers (any depth)
    those whose core output was recorded."""
    if scheme.per_step_parameters:
        return len(scheme.routers) - 1
    return next(t for t in itertools.count() if Recorded.core_output(t) not in recorded)


def effective_coefficients(routing: Sequence[StepRouting]) -> List[Dict[str, Tensor]]:
    """Per read step, the per-token coefficient [s, b] of each Eq. 7 source (module docstring).

    ``routing`` must start at the transitional step and be consecutive."""
    writes: List[Tensor] = []  # [s, b, B] per source written so far (prelude, core0, ...)
    out = []
    for r in routing:
        writes.append(r.write)
        coefficients = {"emb": r.read[..., 0]}  # [s, b]
        for name, w in zip(source_names(r.step)[1:], writes):
            coefficients[name] = (r.read * w).sum(dim=-1)  # [s, b]
        out.append(coefficients)
    return out


def sources(states: States, step: int) -> Dict[str, Tensor]:
    """The recorded tensors [s, b, h] behind the coefficient names of ``step``."""
    recorded = state_dict_of(states)
    names = {"emb": Recorded.EMBEDDINGS, "prelude": Recorded.PRELUDE}
    return {name: recorded[names.get(name, name)] for name in source_names(step)}


def reconstruct(coefficients: Mapping[str, Tensor], terms: Mapping[str, Tensor]) -> Tensor:
    """sum_j c_j x_j: [s, b] coefficients times [s, b, h] sources -> [s, b, h]."""
    return sum(c.unsqueeze(-1) * terms[name] for name, c in coefficients.items())


# ---------------------------------------------------------------------------------------------
# per-token statistics of one weight tensor


def entropy(weights: Tensor) -> Tensor:
    """Per-token entropy in nats of a distribution over the last dim: [..., B] -> [...].
    0 log 0 counts as 0, so a one-hot distribution has entropy 0 and a uniform one log B."""
    w = weights.double()
    return -(w * torch.log(w.clamp_min(1e-300))).sum(dim=-1)


def argmax_usage(weights: Tensor) -> Tensor:
    """Fraction of tokens whose largest weight is on slot b: [..., B] -> [B]. Unlike the mean
    weight this shows collapse: usage 1.0 on one slot means every token mostly uses that slot."""
    buffer_slots = weights.shape[-1]
    winners = weights.reshape(-1, buffer_slots).argmax(dim=-1)
    return torch.bincount(winners, minlength=buffer_slots).double() / winners.numel()


def histogram(weights: Tensor, bins: int = HISTOGRAM_BINS) -> Tensor:
    """Token counts per weight bin of [0, 1], per slot: [..., B] -> [B, bins] (float64)."""
    w = weights.reshape(-1, weights.shape[-1]).double().clamp(0.0, 1.0)  # [n, B]
    index = (w * bins).long().clamp_max(bins - 1)  # [n, B]; weight 1.0 falls in the last bin
    counts = torch.zeros(w.shape[1], bins, dtype=torch.float64, device=w.device)
    return counts.scatter_add_(1, index.t(), torch.ones_like(w).t())


# ---------------------------------------------------------------------------------------------
# accumulating over tokens and samples


class Moments:
    """Running mean and (population) std of a stream of per-token values, elementwise over a
    fixed trailing shape, in float64: aggregate hundreds of samples without keeping them."""

    def __init__(self):
        self.count, self.total, self.squares = 0, None, None

    def add(self, values: Tensor, token_dims: int) -> None:
        """``values`` with ``token_dims`` leading token dims (e.g. [s, b, B] with 2)."""
        v = values.detach().double().reshape(-1, *values.shape[token_dims:])
        total, squares = v.sum(dim=0).cpu(), (v * v).sum(dim=0).cpu()
        self.count += v.shape[0]
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def mean(self) -> Tensor:
        return self.total / self.count

    def std(self) -> Tensor:
        return (self.squares / self.count - self.mean() ** 2).clamp_min(0.0).sqrt()


class WeightStats:
    """One router's weights over many tokens: mean/std per slot, argmax usage, histogram and
    entropy."""

    def __init__(self, buffer_slots: int, bins: int = HISTOGRAM_BINS):
        self.buffer_slots, self.bins = buffer_slots, bins
        self.weights, self.entropy = Moments(), Moments()
        self.counts = torch.zeros(buffer_slots, bins, dtype=torch.float64)
        self.winners = torch.zeros(buffer_slots, dtype=torch.float64)

    def add(self, weights: Tensor) -> None:  # [s, b, B]
        w = weights.detach()
        self.weights.add(w, 2)
        self.entropy.add(entropy(w), 2)
        self.counts += histogram(w, self.bins).cpu()
        self.winners += argmax_usage(w).cpu() * w[..., 0].numel()

    def summary(self) -> dict:
        log_b = math.log(self.buffer_slots)
        tokens = self.weights.count
        return {
            "mean": _floats(self.weights.mean()), "std": _floats(self.weights.std()),
            "usage": _floats(self.winners / tokens),
            "histogram": _floats(self.counts / tokens),
            "entropy": {"mean": float(self.entropy.mean()), "std": float(self.entropy.std()),
                        "normalized_mean": float(self.entropy.mean()) / log_b,
                        "normalized_std": float(self.entropy.std()) / log_b},
        }


class RouterStats:
    """Router and buffer statistics of a MeSH model over all tokens of many samples.

    ``add(states)`` takes one forward pass's recorded states; ``summary()`` gives, per step
    (transition, step0, ..): read and write ``WeightStats`` and the mean/std over tokens of
    every Eq. 7 coefficient."""

    def __init__(self, scheme, bins: int = HISTOGRAM_BINS):
        self.scheme, self.bins = scheme, bins
        self.buffer_slots = scheme.buffer_slots
        self.steps: Dict[int, Dict[str, object]] = {}

    @torch.no_grad()
    def add(self, states: States) -> None:
        routing = routing_weights(self.scheme, states)
        for r, coefficients in zip(routing, effective_coefficients(routing)):
            step = self.steps.setdefault(r.step, {
                "read": WeightStats(self.buffer_slots, self.bins),
                "write": WeightStats(self.buffer_slots, self.bins),
                "coefficients": {name: Moments() for name in coefficients}})
            step["read"].add(r.read)
            step["write"].add(r.write)
            for name, c in coefficients.items():
                step["coefficients"][name].add(c, 2)

    def summary(self) -> dict:
        steps = []
        for t in sorted(self.steps):
            stats = self.steps[t]
            coefficients = stats["coefficients"]
            steps.append({
                "step": t, "label": step_label(t), "reads": f"h({t + 1})",
                "read": stats["read"].summary(), "write": stats["write"].summary(),
                "coefficients": {
                    "sources": list(coefficients),
                    "mean": [float(m.mean()) for m in coefficients.values()],
                    "std": [float(m.std()) for m in coefficients.values()]},
            })
        tokens = next(iter(self.steps.values()))["read"].weights.count if self.steps else 0
        return {"buffer_slots": self.buffer_slots, "tokens": tokens,
                "histogram_edges": _floats(torch.linspace(0, 1, self.bins + 1)),
                "steps": steps}


@torch.no_grad()
def router_statistics(model, batches: Iterable[Tuple[Tensor, Tensor]]) -> Optional[dict]:
    """Run ``model`` on (input_ids [b, s], position_ids [b, s]) batches and summarise its
    routers (``RouterStats.summary``); None when the model has no MeSH scheme."""
    scheme = mesh_scheme(model)
    if scheme is None:
        return None
    stats = RouterStats(scheme)
    for input_ids, position_ids in batches:
        states: List[Tuple[str, Tensor]] = []
        model(input_ids, position_ids, states=states)
        stats.add(states)
    return stats.summary()


@torch.no_grad()
def router_summary(model, states: States) -> Dict[str, Tensor]:
    """Scalars (0-dim fp32 tensors, on the model's device: no host sync) for the trainer's log,
    from one forward pass's states.

    Cheap: two Linear(h -> B) per step on states the forward already holds, and reductions over
    tokens; no extra forward. Names (t = 'transition' for the prelude's write/read, else
    'step0'..): ``mesh/{t}/read_entropy`` and ``write_entropy`` (mean per-token entropy, nats),
    ``read_entropy_norm`` / ``write_entropy_norm`` (the same / log B: 1 = uniform, 0 = one-hot),
    ``read_slot_usage_max`` / ``write_slot_usage_max`` (largest fraction of tokens whose top
    slot is the same slot: 1 = collapsed onto one slot), ``coef_emb``, ``coef_prelude``,
    ``coef_core{j}`` (mean over tokens of the Eq. 7 coefficients of h(t+1), module docstring).
    Values are over this process's tokens only (under sequence or data parallelism, one shard).
    Empty for models without MeSH or a pipeline stage without the recorded steps."""
    scheme = mesh_scheme(model)
    if scheme is None:
        return {}
    recorded = {name: h.detach() for name, h in state_dict_of(states).items()}
    # routers run in the model's dtype (as in training); the statistics in fp32 / fp64
    routing = [StepRouting(r.step, r.write.float(), r.read.float())
               for r in routing_weights(scheme, recorded)]
    log_b = math.log(scheme.buffer_slots)
    out: Dict[str, Tensor] = {}
    for r, coefficients in zip(routing, effective_coefficients(routing)):
        prefix = f"mesh/{step_label(r.step)}"
        for kind, w in (("read", r.read), ("write", r.write)):
            h = entropy(w).mean().float()
            out[f"{prefix}/{kind}_entropy"] = h
            out[f"{prefix}/{kind}_entropy_norm"] = h / log_b
            out[f"{prefix}/{kind}_slot_usage_max"] = argmax_usage(w).max().float()
        for name, c in coefficients.items():
            out[f"{prefix}/coef_{name}"] = c.float().mean()
    return out


def _floats(t: Tensor):
    return t.double().cpu().tolist()
