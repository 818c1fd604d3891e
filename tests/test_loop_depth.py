"""Loop depth sampling (loop_depth.py) and truncated backprop through the block."""

import math

import numpy as np
import pytest
import torch

from conftest import random_batch, tiny_config
from megatron_mesh.loop_depth import HUGINN_SIGMA, LoopDepth, LoopDraw


def draws(depth, n=20000, seed=1234):
    return np.array([depth.draw(seed, i).num_loops for i in range(n)])


def test_poisson_lognormal_matches_huginns_mean_and_variance():
    """steps = Poisson(tau) + 1, tau ~ LogNormal(log m - s^2/2, s): E = m + 1 and
    Var = E[tau] + Var(tau) = m + m^2 (exp(s^2) - 1)."""
    m = 8.0
    got = draws(LoopDepth("poisson_lognormal", m, trained=2))
    var = m + m * m * (math.exp(HUGINN_SIGMA ** 2) - 1)
    assert got.min() >= 1
    assert got.mean() == pytest.approx(m + 1, rel=0.02)
    assert got.var() == pytest.approx(var, rel=0.06)


def test_poisson_matches_parcae_and_max_caps():
    got = draws(LoopDepth("poisson", 4.0, trained=2))
    # max(Poisson(4), 1): P(0) = e^-4 moves to 1
    assert got.min() == 1 and got.mean() == pytest.approx(4 + math.exp(-4), rel=0.02)
    assert got.var() == pytest.approx(4.0, rel=0.06)
    capped = draws(LoopDepth("poisson", 4.0, trained=2, max=5))
    assert capped.max() == 5 and (capped == 5).mean() == pytest.approx((got >= 5).mean(), abs=0.02)


def test_a_draw_is_a_function_of_seed_and_iteration_only():
    """The same on every rank and after a resume: nothing but (seed, iteration) goes in."""
    depth = LoopDepth("poisson_lognormal", 6.0, trained=2, backprop=3)
    first = [depth.draw(7, i) for i in range(50)]
    torch.manual_seed(99)
    np.random.seed(99)  # global RNG state plays no part
    assert [depth.draw(7, i) for i in range(50)] == first
    assert len({d.num_loops for d in first}) > 3
    assert [depth.draw(8, i) for i in range(50)] != first
    assert all(d.grad_loops == min(3, d.num_loops) for d in first)


def test_fixed_depth_varies_only_when_it_differs_from_the_layout():
    assert not LoopDepth("fixed", 2.0, trained=2).varies
    assert LoopDepth("fixed", 3.0, trained=2).varies
    assert LoopDepth("fixed", 2.0, trained=2, backprop=1).varies
    assert LoopDepth("fixed", 3.0, trained=2).draw(0, 5) == LoopDraw(3, 3)


@pytest.mark.parametrize("overrides, message", [
    (dict(scheme="mesh", loop_depth="poisson"), "state_scheme='mesh' has parameters per loop step"),
    (dict(scheme="static_comb", backprop_loops=1), "has parameters per loop step"),
    (dict(layout="1+1+2+1", scheme="linear_injection", loop_depth="poisson"), "needs a tied looped core"),
    (dict(scheme="mesh_shared", loop_depth="poisson", pipeline_model_parallel_size=2),
     "under pipeline_model_parallel_size=2: each pipeline stage holds a fixed slice"),
    (dict(scheme="linear_injection", backprop_loops=0), "backprop_loops=0: expected a value >= 1"),
    (dict(scheme="linear_injection", loop_depth="gamma"), "loop_depth='gamma': expected one of"),
])
def test_refused_depth_settings_name_the_reason(overrides, message):
    layout = overrides.pop("layout", "1+2R2+1")
    scheme = overrides.pop("scheme")
    with pytest.raises(ValueError, match=message):
        tiny_config(layout, scheme, **overrides)


@pytest.mark.parametrize("scheme", ["linear_injection", "mesh_shared", "anchor"])
def test_truncated_backprop_equals_a_model_whose_first_steps_run_without_grad(megatron_world, scheme):
    """grad_loops=k: the parameters' gradients are those of the same model run step by step
    with the first n - k steps under torch.no_grad (the sources' construction)."""
    from megatron_mesh.model import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(model.config)
    model(tokens, positions, labels=tokens, num_loops=5, grad_loops=2).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    manual_loss(model, tokens, positions, num_loops=5, frozen=3).backward()
    theirs = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7), name
    model.zero_grad()
    model(tokens, positions, labels=tokens, num_loops=5).sum().backward()
    full = dict(model.named_parameters())["decoder.cores.0.0.mlp.linear_fc1.weight"].grad
    assert not torch.allclose(full, ours["decoder.cores.0.0.mlp.linear_fc1.weight"])


def manual_loss(model, tokens, positions, num_loops, frozen):
    """The recurrence written out with the model's own modules (block.forward's docstring)."""
    block = model.decoder
    rotary = model.rotary_pos_emb(tokens.shape[1])

    def layers(modules, h):
        for layer in modules:
            h, _ = layer(h, attention_mask=None, rotary_pos_emb=rotary)
        return h

    h_emb = model.embedding(input_ids=tokens, position_ids=positions) * block.embedding_scale()
    h, state = block.scheme.begin(h_emb, layers(block.prelude.values(), h_emb))
    for t in range(num_loops):
        with torch.no_grad() if t < frozen else torch.enable_grad():
            u = block.scheme.inject(t, h, state)
            h, state = block.scheme.step(t, u, layers(block.core_for_step(t), u), state)
    h = block.final_layernorm(layers(block.coda.values(), block.scheme.end(h, state)))
    logits, _ = model.output_layer(h)
    return model.compute_language_model_loss(tokens, logits).sum()


def test_frozen_steps_cost_forward_flops_only():
    from megatron_mesh.stats import DepthCost, expected_train_flops_per_token, train_flops_per_token

    cfg = tiny_config("1+2R2+1", "linear_injection", loop_depth="poisson", mean_loops=4.0,
                      backprop_loops=2)
    at_k = train_flops_per_token(cfg, 32)
    assert train_flops_per_token(cfg, 32, LoopDraw(2, 2)) == at_k
    one_frozen = train_flops_per_token(cfg, 32, LoopDraw(3, 2)) - at_k
    one_more = train_flops_per_token(cfg, 32, LoopDraw(3, 3)) - at_k
    assert one_more == pytest.approx(3 * one_frozen)
    cost = DepthCost.of(cfg, 32)  # what the trainer counts each step with
    for draw in (LoopDraw(2, 2), LoopDraw(5, 2), LoopDraw(1, 1)):
        assert cost.at(draw.num_loops, draw.grad_loops) == pytest.approx(train_flops_per_token(cfg, 32, draw))
    mean = LoopDepth.of(cfg).expected()
    expected = at_k + (mean.num_loops - 2) * one_frozen + (mean.grad_loops - 2) * 2 * one_frozen
    assert expected_train_flops_per_token(cfg, 32) == pytest.approx(expected)


def test_full_recompute_per_loop_step_under_truncated_backprop(megatron_world):
    """Recompute chunks of one core application (uniform, 2 layers) run only for the steps with
    gradients (the others keep no graph to recompute); the gradients are unchanged."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mesh.model import MeshGPTModel

    def grads(**recompute):
        torch.manual_seed(0)
        model = MeshGPTModel(tiny_config("1+2R2+1", "linear_injection", **recompute)).train()
        calls = []
        for layer in model.decoder.layers:
            layer.register_forward_hook(lambda *_: calls.append(1))
        tokens, positions = random_batch(model.config)
        model_parallel_cuda_manual_seed(7)
        model(tokens, positions, labels=tokens, num_loops=4, grad_loops=2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    again, calls = grads(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    assert plain_calls == 1 + 4 * 2 + 1
    # prelude, the two steps with gradients (not the two without) and the coda run again
    assert calls == plain_calls + 1 + 2 * 2 + 1
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
