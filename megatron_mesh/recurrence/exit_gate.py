"""A learned exit over loop steps (Ouro: Zhu et al. 2025, arXiv 2510.25741, Sec. 3.3-3.4).

After loop step t (t = 1..K) the model reads out z(t) = final_norm(coda(end(h(t)))), the input
of its output layer, and scores the per-token loss L(t). Gate t (t = 1..K-1) is the chance of
exiting after step t for a token that got there:

    lambda(t) = sigmoid(a(t)),  a(t) = w_t . z(t) + b_t
    p(t) = lambda(t) prod_{j<t} (1 - lambda(j))   (t < K),   p(K) = prod_{j<K} (1 - lambda(j))

Stage I ('expected_loss') trains everything on the expected loss over exit steps minus beta
times the entropy of the exit distribution, per token:

    sum_t p(t) L(t) - beta H(p),   H(p) = -sum_t p(t) log p(t)

which is the expected loss plus beta KL(p || uniform) up to the constant beta log K: the
uniform prior Ouro uses (a geometric prior, as PonderNet's, favours early exits).

Stage II ('gate_only') freezes the language model and trains the gates alone towards continuing
where the next step still lowers the loss (L detached):

    I(t) = max(0, L(t) - L(t+1)),   w(t) = sigmoid(k (I(t) - gamma))     (ideal P(continue))
    loss = mean_t BCE(1 - lambda(t), w(t)) = -mean_t [w log(1 - lambda) + (1 - w) log lambda]

All of it in float32 from the gate logits a(t) (log lambda = logsigmoid(a)). Tensors are
[steps, ...] with any trailing token shape; nothing here knows of parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EXIT_TRAININGS = ("expected_loss", "gate_only")


@dataclass(frozen=True)
class ExitObjective:
    """How the exit gates train (MeshConfig's exit_* keys)."""

    training: str
    """'expected_loss' (stage I) or 'gate_only' (stage II)."""
    entropy_weight: float
    """beta of stage I."""
    sharpness: float
    """k of stage II."""
    margin: float
    """gamma of stage II: the loss improvement (nats) below which continuing is not worth it."""

    @classmethod
    def of(cls, config) -> "ExitObjective":
        return cls(config.exit_training, config.exit_entropy_weight, config.exit_gate_sharpness,
                   config.exit_gate_margin)


@dataclass
class ExitLoss:
    """Per-token results of one forward with exit gates, each [b, s]."""

    objective: Tensor
    """What the backward pass minimises (stage I or stage II loss)."""
    expected_loss: Tensor
    """sum_t p(t) L(t): the loss of the model exiting where its gates say, in expectation."""
    exit_step: Tensor
    """sum_t t p(t): the expected loop steps."""
    entropy: Tensor
    """H(p) in nats."""
    final_loss: Tensor
    """L(K): the loss after all K steps."""


class ExitGate(nn.Module):
    """One Linear(h -> 1) per loop step but the last: gates[t - 1] reads z(t)."""

    def __init__(self, hidden_size: int, loops: int):
        super().__init__()
        if loops < 2:
            raise ValueError(f"an exit gate needs K >= 2 loop steps to choose from, got K={loops}")
        self.gates = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(loops - 1))
        for t, gate in enumerate(self.gates, start=1):
            # zero weights and lambda(t) = 1 / (K - t + 1): p is uniform over the K steps for
            # every token, the prior stage I pulls towards, so training starts without a
            # preference (random weights would add per-token noise of ~std * sqrt(h) to a(t))
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, -math.log(loops - t))

    def forward(self, readouts: List[Tensor]) -> Tensor:  # K - 1 of [s, b, h] -> [K - 1, s, b]
        return torch.stack([gate(z).squeeze(-1) for gate, z in zip(self.gates, readouts)])


def _wide(x: Tensor) -> Tensor:
    """float32, or float64 where given (the tests' references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def exit_log_probs(gate_logits: Tensor) -> Tensor:
    """log p(t), t = 1..K, from the gate logits a(t), t = 1..K-1: [K - 1, ...] -> [K, ...]."""
    a = _wide(gate_logits)
    survived = torch.cumsum(F.logsigmoid(-a), dim=0)  # log prod_{j<=t} (1 - lambda(j))
    before = torch.cat([torch.zeros_like(survived[:1]), survived[:-1]])
    return torch.cat([F.logsigmoid(a) + before, survived[-1:]])


def gate_only_loss(gate_logits: Tensor, losses: Tensor, objective: ExitObjective) -> Tensor:
    """Stage II: [K - 1, ...] gate logits and [K, ...] losses -> [...] the mean BCE over steps."""
    a = _wide(gate_logits)
    losses = _wide(losses.detach())
    improvement = (losses[:-1] - losses[1:]).clamp_min(0.0)  # I(t)
    target = torch.sigmoid(objective.sharpness * (improvement - objective.margin))  # w(t)
    bce = -(target * F.logsigmoid(-a) + (1.0 - target) * F.logsigmoid(a))
    return bce.mean(dim=0)


def exit_loss(gate_logits: Tensor, losses: Tensor, objective: ExitObjective) -> ExitLoss:
    """The exit objective and its reports from [K - 1, ...] gate logits and [K, ...] losses."""
    log_p = exit_log_probs(gate_logits)
    p = log_p.exp()
    losses32 = _wide(losses)
    steps = torch.arange(1, p.shape[0] + 1, dtype=p.dtype, device=p.device)
    steps = steps.view(-1, *([1] * (p.dim() - 1)))
    expected = (p * losses32).sum(dim=0)
    entropy = -(p * log_p).sum(dim=0)
    if objective.training == "expected_loss":
        loss = expected - objective.entropy_weight * entropy
    else:
        loss = gate_only_loss(gate_logits, losses, objective)
    return ExitLoss(objective=loss, expected_loss=expected, exit_step=(p * steps).sum(dim=0),
                    entropy=entropy, final_loss=losses32[-1])
