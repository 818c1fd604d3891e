"""The input injection schemes' pieces against their sources' definitions (injection.py)."""

import math

import pytest
import torch

from megatron_mesh.recurrence.injection import (
    DIAGONAL_INIT_DECAY, DiagonalInjection, LinearInjection, LinearInjectionScheme,
)
from megatron_mesh.recurrence.mesh import SchemeOptions


def options(**overrides):
    return SchemeOptions(**{**dict(hidden_size=8, num_loops=2, init_method=torch.nn.init.normal_,
                                   initial_state="random", initial_state_std=0.6), **overrides})


def test_random_initial_state_is_a_normal_cut_at_three_std():
    scheme = LinearInjectionScheme.build("linear_injection", options())
    e = torch.zeros(256, 64, 8)
    torch.manual_seed(0)
    x0, state = scheme.begin(e, e)
    # N(0, s^2) truncated to [-3s, 3s] has variance s^2 (1 - 6 phi(3) / (2 Phi(3) - 1))
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    expected_std = 0.6 * math.sqrt(1 - 6 * phi3 / math.erf(3 / math.sqrt(2)))
    assert abs(x0.std().item() - expected_std) < 0.005
    assert x0.abs().max().item() <= 1.8 and x0.abs().max().item() > 1.5
    assert abs(x0.mean().item()) < 0.005
    assert state.injected is e
    again, _ = scheme.begin(e, e)
    assert not torch.equal(again, x0)  # drawn afresh every forward
    zero = LinearInjectionScheme.build("linear_injection", options(initial_state="zero"))
    assert torch.equal(zero.begin(e, e)[0], torch.zeros_like(e))


def test_diagonal_injection_starts_at_parcae_init_and_contracts():
    inj = DiagonalInjection(8)
    decay, dt = inj.rates()
    assert torch.allclose(decay, torch.full((8,), DIAGONAL_INIT_DECAY))
    assert torch.allclose(dt, torch.full((8,), -math.log(DIAGONAL_INIT_DECAY)))
    assert torch.equal(inj.B, torch.eye(8))
    x, e = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    assert torch.allclose(inj(x, e), DIAGONAL_INIT_DECAY * x - math.log(DIAGONAL_INIT_DECAY) * e, atol=1e-6)
    with torch.no_grad():
        inj.A_log.normal_(0, 3)
        inj.dt_bias.normal_(0, 3)
    assert 0 < inj.spectral_radius() < 1


def test_linear_injection_puts_the_state_first():
    inj = LinearInjection(4, torch.nn.init.normal_)
    x, e = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    w = inj.adapter.weight
    assert torch.allclose(inj(x, e), x @ w[:, :4].T + e @ w[:, 4:].T, atol=1e-6)


def test_initial_state_only_for_injection_schemes():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="initial_state='random' is only used by the input injection"):
        tiny_config("1+2R2+1", "mesh", initial_state="random")
    with pytest.raises(ValueError, match=r"initial_state='normal': expected one of \['zero', 'random'\]"):
        tiny_config("1+2R2+1", "linear_injection", initial_state="normal")
