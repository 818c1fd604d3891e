"""The megatron block against the independent reference of Algorithms 1 and 2."""

import pytest
import torch

from conftest import random_batch, tiny_config
from reference import reference_logits
from megatron_mesh.recurrence.injection import InjectionScheme
from megatron_mesh.recurrence.schemes import scheme_class
from registry import LOOPED, SUMS

# LOOPED and SUMS come from the registry, so the reference must cover a newly registered scheme
# without a test edit ('vanilla' has no loop: test_vanilla_matches_reference).
# The schemes whose loop starts from x(0) = 0 or a random draw (initial_state) instead of h(0).
INJECTIONS = [name for name in LOOPED if issubclass(scheme_class(name), InjectionScheme)]


def build(cfg, seed=0):
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(seed)
    model = MeshGPTModel(cfg).eval()
    # Routers start near-uniform; make every scheme parameter matter for the comparison.
    with torch.no_grad():
        for p in model.decoder.scheme.parameters() if model.decoder.scheme else []:
            p.normal_(0.0, 0.5)
    return model


def assert_matches_reference(cfg, layout, buffer_slots=None):
    """``layout`` and ``buffer_slots`` are written out by hand: the reference does not trust the parser
    or the K+3 default."""
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    with torch.no_grad():
        ours = model(tokens, positions)
        weights = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        theirs = reference_logits(
            weights,
            tokens,
            layout,
            cfg.state_scheme,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.vocab_size,
            buffer_slots,
        )
    assert ours.shape == theirs.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"max |megatron - reference| = {diff}"


@pytest.mark.parametrize("loops", [1, 2, 3])
@pytest.mark.parametrize("scheme", LOOPED + SUMS)
def test_tied_block_matches_paper_reference(megatron_world, scheme, loops):
    layout = dict(prelude=1, cores=(2,), coda=1, loops=loops, tied=True)
    assert_matches_reference(tiny_config(f"1+2R{loops}+1", scheme), layout, buffer_slots=loops + 3)


@pytest.mark.parametrize("scheme", LOOPED)
def test_untied_block_matches_paper_reference(megatron_world, scheme):
    # Appendix E.5 (vanilla+mesh): distinct cores per loop step
    layout = dict(prelude=1, cores=(1, 2), coda=1, loops=2, tied=False)
    assert_matches_reference(tiny_config("1+1+2+1", scheme), layout, buffer_slots=5)


def test_vanilla_matches_reference(megatron_world):
    layout = dict(prelude=3, cores=(), coda=0, loops=0, tied=True)
    assert_matches_reference(tiny_config("3", "vanilla"), layout)


def test_mesh_with_non_default_slots_and_no_prelude(megatron_world):
    layout = dict(prelude=0, cores=(2,), coda=1, loops=2, tied=True)
    assert_matches_reference(tiny_config("0+2R2+1", "mesh", buffer_slots=2), layout, buffer_slots=2)


def test_checkpoint_keys_follow_megatron_core_gpt(megatron_world):
    """Each layer's sharded keys are those megatron-core's own GPTModel (local spec) saves for a
    layer: TransformerLayer's sharded_state_dict ran (TE norm names, TP axes), not a fallback."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mesh.model.gpt import MeshGPTModel

    ours = MeshGPTModel(tiny_config("1+1R2+1", "base")).sharded_state_dict()
    gpt = GPTModel(TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                                     use_cpu_initialization=True, add_bias_linear=True),
                   get_gpt_layer_local_spec(), vocab_size=96, max_sequence_length=64,
                   position_embedding_type="rope").sharded_state_dict()

    def layer_keys(sd, prefix):
        return {v.key[len(prefix):] for v in sd.values() if v.key.startswith(prefix)}

    reference = layer_keys(gpt, "decoder.layers.")
    assert "self_attention.linear_qkv.layer_norm_weight" in reference
    for prefix in ("decoder.prelude.0.", "decoder.cores.0.0.", "decoder.coda.0."):
        assert layer_keys(ours, prefix) == reference


@pytest.mark.parametrize("method, num_layers, extra_calls", [
    ("uniform", 1, 8),  # every application of 1+2R3+1 (N_compute 8) runs twice
    ("uniform", 2, 8),  # chunks of two: the core application is one chunk per loop iteration
    ("block", 3, 3),    # the prelude layer and the first core application only
])
def test_full_recompute_gives_the_same_gradients(megatron_world, method, num_layers, extra_calls):
    """Dropout on: recompute must replay the RNG so every mask (and so every gradient) matches.
    Not bit for bit: recomputed chunks run their backward in a nested autograd call, which sums
    the looped core's gradient contributions in another order (differences ~1e-7; a single
    different dropout mask moves gradients by ~1e-1)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    def grads(**recompute):
        cfg = tiny_config("1+2R3+1", "mesh", hidden_dropout=0.1, attention_dropout=0.1, **recompute)
        model = build(cfg).train()
        calls = []
        for layer in model.decoder.layers:
            layer.register_forward_hook(lambda *_: calls.append(1))
        tokens, positions = random_batch(cfg)
        model_parallel_cuda_manual_seed(7)
        model(tokens, positions, labels=tokens).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    again, calls = grads(recompute_granularity="full", recompute_method=method,
                         recompute_num_layers=num_layers)
    assert (plain_calls, calls) == (8, 8 + extra_calls)
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_selective_recompute_gives_the_same_gradients(megatron_world):
    """megatron-core's core-attention recompute inside every layer application of the loop."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    def grads(**recompute):
        cfg = tiny_config("1+2R3+1", "mesh", attention_dropout=0.1, **recompute)
        model = build(cfg).train()
        calls = []
        for layer in model.decoder.layers:
            layer.self_attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
        tokens, positions = random_batch(cfg)
        model_parallel_cuda_manual_seed(7)
        model(tokens, positions, labels=tokens).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    again, calls = grads(recompute_granularity="selective")
    assert (plain_calls, calls) == (8, 16)  # every attention application recomputed once
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("scheme", INJECTIONS)
def test_injection_from_a_random_state_matches_reference_in_values_and_gradients(megatron_world, scheme):
    """Random x(0) (recorded by the block, handed to the reference) and the gradients of every
    scheme parameter, against the plain-torch loop written from Huginn's and Parcae's code."""
    from megatron_mesh.model.block import Recorded

    cfg = tiny_config("1+2R3+1", scheme, initial_state="random", initial_state_std=0.5)
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    states = []
    ours = model(tokens, positions, states=states)
    x0 = dict(states)[Recorded.loop_state(0)]  # [s, b, h]
    assert 0.4 < x0.std().item() < 0.6 and x0.abs().max().item() <= 1.5 + 1e-6  # cut at 3 std
    ours.sum().backward()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()
               if not k.endswith("_extra_state")}
    scheme_keys = [k for k in weights if k.startswith("decoder.scheme.")]
    for k in scheme_keys:
        weights[k].requires_grad_(True)
    layout = dict(prelude=1, cores=(2,), coda=1, loops=3, tied=True)
    theirs = reference_logits(weights, tokens, layout, scheme, cfg.hidden_size,
                              cfg.num_attention_heads, cfg.vocab_size, x0=x0.detach().transpose(0, 1))
    assert (ours - theirs).abs().max().item() < 1e-5
    theirs.sum().backward()
    params = dict(model.named_parameters())
    assert scheme == "additive_injection" or scheme_keys
    for k in scheme_keys:
        ref, got = weights[k].grad, params[k].grad
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()), k


def test_injection_runs_any_loop_count_mesh_does_not(megatron_world):
    model = build(tiny_config("1+2R2+1", "linear_injection"))
    tokens, positions = random_batch(model.config)
    with torch.no_grad():
        assert model(tokens, positions, num_loops=6).isfinite().all()
    with pytest.raises(ValueError, match="num_loops=3 is out of range.*expected 0..2"):
        build(tiny_config("1+2R2+1", "mesh"))(tokens, positions, num_loops=3)
