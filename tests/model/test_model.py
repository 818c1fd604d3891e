"""Structure of the recursive model: weight sharing, gradient flow, routing weights."""

import pytest
import torch

from conftest import random_batch, tiny_config
from megatron_mesh.recurrence.schemes import SCHEME_NAMES, scheme_class

# Every registered scheme that loops, from the registry: a new scheme's parameters must get
# gradients and be announced without a test edit ('vanilla' has no scheme module to check).
ALL_SCHEMES = [name for name in SCHEME_NAMES if scheme_class(name) is not None]


def build(cfg):
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    return MeshGPTModel(cfg)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_gradients_reach_every_parameter(megatron_world, scheme):
    cfg = tiny_config("1+2R2+1", scheme)
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    model(tokens, positions, labels=torch.roll(tokens, -1, 1)).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reached {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient at {name}"


def test_core_parameters_exist_once_and_are_applied_k_times(megatron_world):
    from megatron_mesh.recurrence.layout import parse_layout

    cfg = tiny_config("1+2R3+1", "mesh")
    model = build(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    core_layers = {n.split(".")[3] for n in names if n.startswith("decoder.cores.")}
    assert {n.split(".")[2] for n in names if n.startswith("decoder.cores.")} == {"0"}
    assert core_layers == {"0", "1"}
    assert len(model.decoder.cores) == 1

    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.decoder.cores[0].values()]
    tokens, positions = random_batch(cfg)
    model(tokens, positions)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * 3  # 2 core layers x K=3 applications
    assert parse_layout(cfg.layout).unique_layers == 4


def test_untied_layout_has_a_core_per_step(megatron_world):
    model = build(tiny_config("1+1+2+1", "mesh"))
    assert [len(c) for c in model.decoder.cores] == [1, 2]
    assert len(model.decoder.scheme.routers) == 3  # K + 1 pairs


def test_mesh_router_shapes_and_bias(megatron_world):
    cfg = tiny_config("1+2R2+1", "mesh", buffer_slots=6)
    model = build(cfg)
    routers = model.decoder.scheme.routers
    assert len(routers) == cfg.num_loops + 1
    for pair in routers:
        for r in (pair.write, pair.read):
            assert r.linear.weight.shape == (6, cfg.hidden_size)
            assert r.linear.bias.shape == (6,)


def test_read_and_write_weights_sum_to_one_per_token(megatron_world):
    cfg = tiny_config("1+2R2+1", "mesh")
    model = build(cfg)
    seen = []
    for pair in model.decoder.scheme.routers:
        for r in (pair.write, pair.read):
            r.register_forward_hook(lambda m, i, out: seen.append(out))
    tokens, positions = random_batch(cfg)
    with torch.no_grad():
        model(tokens, positions)
    assert len(seen) == 2 * (cfg.num_loops + 1)
    for w in seen:
        assert w.shape == (tokens.shape[1], tokens.shape[0], cfg.buffer_slots)  # [s, b, B]
        assert torch.all(w >= 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-6, rtol=0)


def test_buffer_slot_zero_starts_as_the_embeddings(megatron_world):
    from megatron_mesh.recurrence.mesh import initial_buffer

    h_emb = torch.randn(5, 2, 8)
    buf = initial_buffer(h_emb, 4)
    assert buf.shape == (4, 5, 2, 8)
    assert torch.equal(buf[0], h_emb) and not buf[1:].any()


def test_states_are_recorded_for_probes(megatron_world):
    cfg = tiny_config("1+2R3+1", "anchor")
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    states = []
    with torch.no_grad():
        model(tokens, positions, states=states)
    assert [n for n, _ in states] == ["h_emb", "prelude", "h0", "u0", "core0", "h1", "u1", "core1",
                                      "h2", "u2", "core2", "h3", "coda_input", "coda"]


def test_fewer_loops_at_inference_changes_the_output(megatron_world):
    cfg = tiny_config("1+2R3+1", "anchor")
    model = build(cfg).eval()
    tokens, positions = random_batch(cfg)
    with torch.no_grad():
        full = model(tokens, positions)
        assert torch.equal(full, model(tokens, positions, num_loops=3))
        assert not torch.allclose(full, model(tokens, positions, num_loops=1))


def test_unsupported_parallel_settings_fail_loudly(megatron_world):
    with pytest.raises(ValueError, match="context_parallel_size=2 is not supported"):
        build(tiny_config(context_parallel_size=2))


def test_a_config_disagreeing_with_the_pipeline_group_is_refused(megatron_world):
    with pytest.raises(ValueError, match="pipeline group of 1 ranks.*pipeline_model_parallel_size=2"):
        build(tiny_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32))


def test_local_spec_is_used_without_transformer_engine():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_mesh.model.layers import (
        ParallelResidualTransformerLayer,
        default_block_spec,
        family_layer_spec,
        transformer_engine_available,
    )

    assert not transformer_engine_available()
    spec = default_block_spec()
    assert family_layer_spec(spec, tiny_config()).module is ParallelResidualTransformerLayer
    assert family_layer_spec(spec, tiny_config(layer_family="llama")).module is TransformerLayer
    assert spec.final_layernorm is spec.layer.submodules.input_layernorm


def test_num_loops_out_of_range_is_a_clear_error(megatron_world):
    cfg = tiny_config("1+2R2+1", "mesh")
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    with pytest.raises(ValueError, match=r"num_loops=3 is out of range .* expected 0..2"):
        model(tokens, positions, num_loops=3)
    # a tied heuristic scheme has no per-step parameters: more loops than trained are defined
    anchor = build(tiny_config("1+2R2+1", "anchor"))
    assert anchor(tokens, positions, num_loops=4).shape == (2, 16, cfg.vocab_size)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mlp_chunks_for_training=2), "mlp_chunks_for_training"),
        (dict(recompute_granularity="selective", recompute_modules=["mlp"]), "recompute_modules"),
    ],
)
def test_layer_refuses_paths_that_bypass_parallel_residual(megatron_world, overrides, field):
    from megatron_mesh.model.layers import family_layer_spec, local_block_spec
    from megatron.core.transformer.spec_utils import build_module

    cfg = tiny_config(**overrides)
    with pytest.raises(ValueError, match=f"{field}.* is not supported by the GPT-NeoX parallel-residual layer"):
        build_module(family_layer_spec(local_block_spec(), cfg), config=cfg, layer_number=1)


def test_tanh_gelu_runs_megatrons_fused_bias_gelu(megatron_world, monkeypatch):
    """With bias_activation_fusion the MLP takes megatron's fused bias-GELU (the tanh form) and
    computes what the unfused tanh GELU does; erf never fuses (megatron has no erf kernel)."""
    from megatron.core.transformer import mlp

    calls = []
    fused = mlp.bias_gelu_impl
    monkeypatch.setattr(mlp, "bias_gelu_impl", lambda *a: calls.append(1) or fused(*a))
    assert not tiny_config("2", "vanilla", gelu_approximation="none",
                           bias_activation_fusion=True).bias_activation_fusion
    outputs = []
    for fusion in (True, False):
        model = build(tiny_config("2", "vanilla", bias_activation_fusion=fusion))
        tokens, positions = random_batch(model.config)
        loss = model(tokens, positions, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        outputs.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert len(calls) == 2  # the fused model's two layers; the unfused one never calls it
    (fused_loss, fused_grads), (plain_loss, plain_grads) = outputs
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_every_parameter_is_announced_by_its_module_call(megatron_world, scheme):
    """megatron's DDP waits for a parameter's all-gather (overlap_param_gather) in a forward
    pre-hook of the module holding it, so every module holding parameters must be called."""
    model = build(tiny_config("1+2R2+1", scheme))
    announced = set()
    for module in model.modules():
        module.register_forward_pre_hook(
            lambda m, _args: announced.update(map(id, m.parameters(recurse=False))))
    tokens, positions = random_batch(model.config)
    model(tokens, positions)
    silent = [n for n, p in model.named_parameters() if id(p) not in announced]
    assert not silent, f"used without a call of the module holding them: {silent}"
