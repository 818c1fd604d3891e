"""The learned-exit math (recurrence/exit_gate.py) against Ouro's formulas written plainly."""

import math

import pytest
import torch

from megatron_mesh.recurrence.exit_gate import (
    ExitGate, ExitObjective, exit_log_probs, exit_loss, gate_only_loss,
)

STAGE_I = ExitObjective("expected_loss", entropy_weight=0.1, sharpness=50.0, margin=0.005)
STAGE_II = ExitObjective("gate_only", entropy_weight=0.1, sharpness=50.0, margin=0.005)


def plain_exit_distribution(lam):  # lam: list of K-1 floats -> list of K probabilities
    p, survive = [], 1.0
    for value in lam:
        p.append(value * survive)
        survive *= 1.0 - value
    return p + [survive]


def plain_objective(a, losses, objective):
    """One token, from the paper's sums (float64 Python over a [K-1] and [K] list)."""
    lam = [1 / (1 + math.exp(-x)) for x in a]
    p = plain_exit_distribution(lam)
    expected = sum(pt * lt for pt, lt in zip(p, losses))
    entropy = -sum(pt * math.log(pt) for pt in p)
    if objective.training == "expected_loss":
        return expected - objective.entropy_weight * entropy, expected, entropy
    bce = 0.0
    for t, value in enumerate(lam):
        improvement = max(0.0, losses[t] - losses[t + 1])
        w = 1 / (1 + math.exp(-objective.sharpness * (improvement - objective.margin)))
        bce -= w * math.log(1 - value) + (1 - w) * math.log(value)
    return bce / len(lam), expected, entropy


def test_exit_distribution_sums_to_one_and_matches_the_products():
    a = torch.randn(4, 3, 5, dtype=torch.float64)
    p = exit_log_probs(a).exp()
    torch.testing.assert_close(p.sum(0), torch.ones(3, 5, dtype=torch.float64))
    lam = torch.sigmoid(a)
    plain = plain_exit_distribution(lam[:, 1, 2].tolist())
    torch.testing.assert_close(p[:, 1, 2], torch.tensor(plain, dtype=torch.float64))


@pytest.mark.parametrize("objective", [STAGE_I, STAGE_II], ids=lambda o: o.training)
def test_objective_and_gradients_equal_the_plain_formulas(objective):
    torch.manual_seed(0)
    K, tokens = 4, 6
    a = torch.randn(K - 1, tokens, dtype=torch.float64, requires_grad=True)
    losses = (torch.rand(K, tokens, dtype=torch.float64) * 3).requires_grad_(True)
    out = exit_loss(a, losses, objective)
    for i in range(tokens):
        want, expected, entropy = plain_objective(a[:, i].tolist(), losses[:, i].tolist(), objective)
        assert out.objective[i].item() == pytest.approx(want, rel=1e-6)
        assert out.expected_loss[i].item() == pytest.approx(expected, rel=1e-6)
        assert out.entropy[i].item() == pytest.approx(entropy, rel=1e-6)
    # gradients against autograd of the same formulas written as explicit products
    out.objective.sum().backward()
    a2, l2 = a.detach().clone().requires_grad_(True), losses.detach().clone().requires_grad_(True)
    lam = torch.sigmoid(a2)
    survive, p = torch.ones(tokens, dtype=torch.float64), []
    for t in range(K - 1):
        p.append(lam[t] * survive)
        survive = survive * (1 - lam[t])
    p = torch.stack(p + [survive])
    if objective.training == "expected_loss":
        ref = (p * l2).sum(0) + objective.entropy_weight * (p * p.log()).sum(0)
    else:
        improvement = (l2[:-1] - l2[1:]).clamp_min(0).detach()
        w = torch.sigmoid(objective.sharpness * (improvement - objective.margin))
        ref = -(w * (1 - lam).log() + (1 - w) * lam.log()).mean(0)
    ref.sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(losses.grad, l2.grad)
    if objective.training == "gate_only":
        assert losses.grad is None  # stage II never trains the language model


def test_exit_step_is_the_mean_of_the_distribution():
    a = torch.tensor([[10.0], [0.0], [0.0]])  # lambda(1) ~ 1: exits after one step
    out = exit_loss(a, torch.ones(4, 1), STAGE_I)
    assert out.exit_step.item() == pytest.approx(1.0, abs=1e-3)
    assert out.final_loss.item() == 1.0


def test_stage_two_targets_continue_where_the_next_step_helps():
    losses = torch.tensor([[3.0], [2.0], [2.0]])  # step 2 helps by 1 nat, step 3 not at all
    a = torch.zeros(2, 1)
    per_step = []
    for t in range(2):
        one = gate_only_loss(a[t:t + 1], losses[t:t + 2], STAGE_II)
        per_step.append(one.item())
    # continue target ~1 at step 1 (improvement 1), ~sigmoid(-0.25) at step 2 (none)
    w2 = 1 / (1 + math.exp(50 * 0.005))
    assert per_step[0] == pytest.approx(math.log(2), rel=1e-5)  # lambda = 0.5 either way
    assert gate_only_loss(torch.tensor([[-20.0], [0.0]]), losses, STAGE_II)[0] < per_step[0]
    assert w2 < 0.5


def test_gate_starts_uniform_and_refuses_one_step():
    gate = ExitGate(8, 4)
    z = [torch.randn(3, 2, 8) for _ in range(3)]
    p = exit_log_probs(gate(z)).exp()  # [4, 3, 2]
    torch.testing.assert_close(p, torch.full_like(p, 0.25))
    with pytest.raises(ValueError, match="K >= 2"):
        ExitGate(8, 1)
