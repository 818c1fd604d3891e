"""Loop depth sampling (loop_depth.py) and truncated backprop through the block."""

import math

import numpy as np
import pytest
import torch

from conftest import random_batch, tiny_config
from megatron_mesh.recurrence.loop_depth import HUGINN_SIGMA, LoopDepth, LoopDraw
from registry import ANY_DEPTH


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
    assert all(d.backprop_loops == min(3, d.num_loops) for d in first)


def test_fixed_depth_varies_only_when_it_differs_from_the_layout():
    assert not LoopDepth("fixed", 2.0, trained=2).varies
    assert LoopDepth("fixed", 3.0, trained=2).varies
    assert LoopDepth("fixed", 2.0, trained=2, backprop=1).varies
    assert LoopDepth("fixed", 3.0, trained=2).draw(0, 5) == LoopDraw(3, 3)


@pytest.mark.parametrize("overrides, message", [
    (dict(scheme="mesh", loop_depth="poisson"), "state_scheme='mesh' has parameters per loop step"),
    (dict(scheme="static_comb", backprop_loops=1), "has parameters per loop step"),
    (dict(layout="1+1+2+1", scheme="linear_injection", loop_depth="poisson"), "needs a tied looped core"),
    (dict(scheme="mesh_shared", loop_depth="poisson", pipeline_model_parallel_size=2,
          pipeline_dtype=torch.float32),
     "under 2 pipeline stages: the stages hold a fixed graph of the layout's K=2 loop steps and "
     "mask each draw into it, so a draw must fit: set max_loops <= 2 [(]got None[)]"),
    (dict(layout="1+2R4+1", scheme="linear_injection", loop_depth="poisson", max_loops=4,
          pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, pipeline_stage_layers=(4, 6)),
     "a stage starts at layer application 4, inside loop step 1; set pipeline_stage_layers"),
    (dict(scheme="linear_injection", backprop_loops=0), "backprop_loops=0: expected a value >= 1"),
    (dict(scheme="linear_injection", loop_depth="gamma"), "loop_depth='gamma': expected one of"),
])
def test_refused_depth_settings_name_the_reason(overrides, message):
    layout = overrides.pop("layout", "1+2R2+1")
    scheme = overrides.pop("scheme")
    with pytest.raises(ValueError, match=message):
        tiny_config(layout, scheme, **overrides)


@pytest.mark.parametrize("scheme", ANY_DEPTH)
def test_truncated_backprop_equals_a_model_whose_first_steps_run_without_grad(megatron_world, scheme):
    """backprop_loops=k: the parameters' gradients are those of the same model run step by step
    with the first n - k steps under torch.no_grad (the sources' construction) and computed by
    a copy of the model, so that no gradient can reach the model's parameters through them."""
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(model.config)
    model(tokens, positions, labels=tokens, num_loops=5, backprop_loops=2).sum().backward()
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
    """The recurrence written out with the model's own modules (block.forward's docstring), the
    first ``frozen`` loop steps under no_grad with a copy's: torch.no_grad alone would not do, as
    megatron-core's TransformerLayer adds its biases and its residual under torch.enable_grad, so
    a step under no_grad still passes gradients to its biases (here the copy's) and, through the
    residual, to whatever made its input (here cut: a frozen core reads a detached input, or
    'base', whose step is the core's output, would pass the prelude a gradient)."""
    from megatron_mesh.model.gpt import MeshGPTModel

    twin = MeshGPTModel(model.config)
    twin.load_state_dict(model.state_dict())
    block, copy_block = model.decoder, twin.decoder
    rotary = model.rotary_pos_emb(tokens.shape[1])

    def layers(modules, h):
        for layer in modules:
            h, _ = layer(h, attention_mask=None, rotary_pos_emb=rotary)
        return h

    h_emb = model.embedding(input_ids=tokens, position_ids=positions) * block.embedding_scale()
    h, state = block.scheme.begin(h_emb, layers(block.prelude.values(), h_emb))
    for t in range(num_loops):
        step_block = copy_block if t < frozen else block
        with torch.no_grad() if t < frozen else torch.enable_grad():
            u = step_block.scheme.inject(t, h, state)
            core_input = u.detach() if t < frozen else u
            h, state = step_block.scheme.step(t, u, layers(step_block.core_for_step(t), core_input), state)
    h = block.final_layernorm(layers(block.coda.values(), block.scheme.end(h, state)))
    logits, _ = model.output_layer(h)
    return model.compute_language_model_loss(tokens, logits).sum()


def test_frozen_steps_cost_forward_flops_only():
    from megatron_mesh.model.stats import (DepthCost, expected_depth, expected_train_flops_per_token,
                                           train_flops_per_token)

    cfg = tiny_config("1+2R2+1", "linear_injection", loop_depth="poisson", mean_loops=4.0,
                      backprop_loops=2)
    at_k = train_flops_per_token(cfg, 32)
    assert train_flops_per_token(cfg, 32, LoopDraw(2, 2)) == at_k
    one_frozen = train_flops_per_token(cfg, 32, LoopDraw(3, 2)) - at_k
    one_more = train_flops_per_token(cfg, 32, LoopDraw(3, 3)) - at_k
    assert one_more == pytest.approx(3 * one_frozen)
    cost = DepthCost.of(cfg, 32)  # what the trainer counts each step with
    for draw in (LoopDraw(2, 2), LoopDraw(5, 2), LoopDraw(1, 1)):
        assert cost.at(draw.num_loops, draw.backprop_loops) == pytest.approx(train_flops_per_token(cfg, 32, draw))
    mean = LoopDepth.of(cfg).expected()
    expected = at_k + (mean.num_loops - 2) * one_frozen + (mean.backprop_loops - 2) * 2 * one_frozen
    assert expected_train_flops_per_token(cfg, 32, expected_depth(cfg)) == pytest.approx(expected)


def test_full_recompute_per_loop_step_under_truncated_backprop(megatron_world):
    """Recompute chunks of one core application (uniform, 2 layers) run only for the steps with
    gradients (the others keep no graph to recompute); the gradients are unchanged."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mesh.model.gpt import MeshGPTModel

    def grads(**recompute):
        torch.manual_seed(0)
        model = MeshGPTModel(tiny_config("1+2R2+1", "linear_injection", **recompute)).train()
        calls = []
        for layer in model.decoder.layers:
            layer.register_forward_hook(lambda *_: calls.append(1))
        tokens, positions = random_batch(model.config)
        model_parallel_cuda_manual_seed(7)
        model(tokens, positions, labels=tokens, num_loops=4, backprop_loops=2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    again, calls = grads(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
    assert plain_calls == 1 + 4 * 2 + 1
    # prelude, the two steps with gradients (not the two without) and the coda run again
    assert calls == plain_calls + 1 + 2 * 2 + 1
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


PER_ELEMENT = dict(sampler="poisson", mean=3.0, trained=2, max=6, backprop=2)


def test_a_per_sequence_draw_runs_each_element_its_own_depth_frozen_steps_first():
    """Parcae's order: max(frozen) steps without gradients, then max(grad) with; an element is
    active for the first of its own steps in each phase."""
    depth = LoopDepth(**PER_ELEMENT, per="sequence")
    draw = depth.draw(1234, 3, range(16))
    steps = np.array([depth.draw(1234, 3, [g]).num_loops for g in range(16)])
    grad = np.minimum(steps, 2)
    assert len(set(steps)) > 2
    assert draw.num_loops == (steps - grad).max() + grad.max() and draw.backprop_loops == grad.max()
    frozen_phase, grad_phase = draw.active[:draw.num_loops - 2], draw.active[draw.num_loops - 2:]
    np.testing.assert_array_equal(frozen_phase.sum(0), steps - grad)
    np.testing.assert_array_equal(grad_phase.sum(0), grad)
    for phase in (frozen_phase, grad_phase):  # no element resumes after sitting a step out
        assert (np.diff(phase.astype(int), axis=0) <= 0).all()
    assert draw.mean_loops == steps.mean() and draw.mean_backprop_loops == grad.mean()


@pytest.mark.parametrize("per, shape", [("sequence", (8,)), ("token", (8, 5))])
def test_a_sequences_depth_does_not_depend_on_how_the_batch_is_split(per, shape):
    """Sequence g's depth is drawn from (seed, iteration, g): DP ranks and micro-batches
    holding other slices of the global batch draw the same depths as one process."""
    depth = LoopDepth(**PER_ELEMENT, per=per)
    whole = depth.draw(7, 11, range(8), seq_length=5)
    halves = [depth.draw(7, 11, range(start, start + 4), seq_length=5) for start in (0, 4)]
    def steps(draw):
        return draw.active.sum(0)
    assert steps(whole).shape == shape
    np.testing.assert_array_equal(np.concatenate([steps(h) for h in halves]), steps(whole))
    other = depth.draw(7, 12, range(8), seq_length=5)
    assert not np.array_equal(steps(other), steps(whole))


def test_per_token_depths_follow_the_sampler():
    """Each token's depth has the sampler's distribution: Y = max(X, 1), X ~ Poisson(3), so
    E[Y] = 3 + P(X=0) and Var Y = E[X^2] + P(X=0) - E[Y]^2 = 3 - 5 e^-3 - e^-6."""
    draw = LoopDepth("poisson", 3.0, trained=2, per="token").draw(0, 0, range(40), seq_length=500)
    steps = draw.active.sum(0)  # [b, s]
    assert steps.min() == 1 and steps.mean() == pytest.approx(3 + math.exp(-3), rel=0.02)
    assert steps.var() == pytest.approx(3 - 5 * math.exp(-3) - math.exp(-6), rel=0.03)


def test_loop_depth_per_needs_a_sampled_depth_and_a_cap():
    with pytest.raises(ValueError, match="loop_depth_per='token' draws a depth per token: it needs "
                                         "a sampled loop_depth"):
        tiny_config("1+2R2+1", "linear_injection", loop_depth_per="token")
    with pytest.raises(ValueError, match="a micro-batch runs the steps its deepest sequence draws, "
                                         "the maximum of many draws: set max_loops"):
        tiny_config("1+2R2+1", "linear_injection", loop_depth="poisson", loop_depth_per="sequence")


def test_truncated_backprop_at_a_fixed_depth_fits_the_pipelines_graph():
    """No max_loops needed when the depth is fixed at most K: only the backprop is truncated."""
    config = tiny_config("1+2R2+1", "linear_injection", backprop_loops=1,
                         pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert config.deepest_draw() == 2
    with pytest.raises(ValueError, match="set max_loops <= 2"):
        tiny_config("1+2R2+1", "linear_injection", mean_loops=3, pipeline_model_parallel_size=2,
                    pipeline_dtype=torch.float32)


@pytest.mark.parametrize("scheme", ANY_DEPTH)
def test_per_sequence_depth_equals_each_sequence_run_alone(megatron_world, scheme):
    """Token losses and parameter gradients of a batch whose sequences run 1..6 loop steps
    (the last 2 with gradients) equal those of each sequence run alone at its own depth."""
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(model.config, batch=4)
    draw = LoopDepth(**PER_ELEMENT, per="sequence").draw(1234, 3, range(4))
    steps = draw.active.sum(0)
    assert len(set(steps)) > 1
    batch = model(tokens, positions, labels=tokens, num_loops=draw.num_loops,
                  backprop_loops=draw.backprop_loops, step_mask=torch.from_numpy(draw.active))  # [b, s]
    batch.sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(tokens[i:i + 1], positions[i:i + 1], labels=tokens[i:i + 1],
                             num_loops=int(steps[i]), backprop_loops=min(2, int(steps[i])))
                       for i in range(4)])
    alone.sum().backward()
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6)


def test_per_token_depth_freezes_a_tokens_state_after_its_last_step(megatron_world):
    """A token's h(t) stops changing once it has run its own steps (later steps still attend to
    it); with every token of a sequence at the same depth it is that sequence's per-sequence run."""
    from megatron_mesh.model.block import Recorded
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config("1+2R2+1", "mesh_shared"))
    tokens, positions = random_batch(model.config, batch=2, seq=8)
    draw = LoopDepth("poisson", 3.0, trained=2, max=6, per="token").draw(5, 1, range(2), seq_length=8)
    steps = draw.active.sum(0)  # [b, s]
    states = []
    with torch.no_grad():
        model(tokens, positions, num_loops=draw.num_loops, step_mask=torch.from_numpy(draw.active),
              states=states)
    named = dict(states)
    final = named[Recorded.loop_state(draw.num_loops)]  # [s, b, h]
    for b in range(2):
        for s in range(8):
            own = named[Recorded.loop_state(int(steps[b, s]))]
            torch.testing.assert_close(final[s, b], own[s, b], rtol=0, atol=0)
    assert len(np.unique(steps)) > 2
    per_sequence = torch.from_numpy(np.repeat(draw.active[:, :, :1], 8, axis=2))  # token 0's depth
    with torch.no_grad():
        tokenwise = model(tokens, positions, labels=tokens, num_loops=draw.num_loops, step_mask=per_sequence)
        sequencewise = model(tokens, positions, labels=tokens, num_loops=draw.num_loops,
                             step_mask=per_sequence[:, :, 0])
    torch.testing.assert_close(tokenwise, sequencewise, rtol=0, atol=0)


def test_a_pipeline_draw_is_masked_into_the_layouts_graph():
    """Under pipeline parallelism every draw runs on the fixed graph of K steps, (K - k) without
    gradients and k with: each element still runs its own steps, the last min(k, n) with."""
    depth = LoopDepth("poisson", 2.0, trained=4, max=4, backprop=2, per="sequence")
    assert depth.graph_steps == (2, 2)
    for iteration in range(20):
        free = depth.draw(3, iteration, range(4))
        fixed = depth.draw(3, iteration, range(4), graph_steps=depth.graph_steps)
        assert fixed.num_loops == 4 and fixed.backprop_loops == 2
        with_gradients = free.active[free.num_loops - free.backprop_loops:]
        np.testing.assert_array_equal(fixed.active[2:].sum(0), with_gradients.sum(0))
        np.testing.assert_array_equal(fixed.active.sum(0), free.active.sum(0))
    batch = LoopDepth("poisson", 2.0, trained=4, max=4, backprop=2)
    fixed = batch.draw(3, 5, range(3), graph_steps=batch.graph_steps)
    assert (fixed.active.sum(0) == batch.draw(3, 5).num_loops).all()
    with pytest.raises(ValueError, match="does not fit the graph"):
        LoopDepth("poisson", 2.0, trained=4, max=6, backprop=2, per="sequence").draw(
            3, 1, range(64), graph_steps=(2, 2))


@pytest.mark.parametrize("scheme", ANY_DEPTH)
def test_a_draw_masked_into_the_fixed_graph_equals_the_draw_run_alone(megatron_world, scheme):
    """The padding steps a pipeline runs are no-ops: losses and gradients as without them."""
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config("1+2R4+1", scheme))
    tokens, positions = random_batch(model.config, batch=4)
    depth = LoopDepth("poisson", 1.0, trained=4, max=4, backprop=2, per="token")
    # a step whose deepest token needs fewer than the graph's 4 steps
    step = next(i for i in range(100) if depth.draw(1234, i, range(4), tokens.shape[1]).num_loops < 4)

    def run(**draw_kwargs):
        draw = depth.draw(1234, step, range(4), tokens.shape[1], **draw_kwargs)
        model.zero_grad()
        loss = model(tokens, positions, labels=tokens, num_loops=draw.num_loops,
                     backprop_loops=draw.backprop_loops, step_mask=torch.from_numpy(draw.active))
        loss.sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, draw

    loss, grads, draw = run()
    padded_loss, padded_grads, padded = run(graph_steps=depth.graph_steps)
    assert draw.num_loops < padded.num_loops == 4
    torch.testing.assert_close(padded_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(padded_grads[name], grads[name], rtol=1e-4, atol=1e-6)
