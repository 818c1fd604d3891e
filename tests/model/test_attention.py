"""SDPAttention (torch scaled_dot_product_attention) against megatron-core's DotProductAttention.

fp32 on CPU: the two differ only by summation order, so outputs and gradients agree to ~1e-6;
a wrong scale, mask or GQA head grouping moves them by ~1e-1.
"""

import pytest
import torch

from conftest import random_batch, tiny_config


def attention_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=4, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                  attention_dropout=0.0)  # megatron-core defaults to 0.1
    fields.update(overrides)
    return TransformerConfig(**fields)


def core_attention(kind, config, layer_number=1, **kwargs):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_mesh.model.attention import SDPAttention

    cls = SDPAttention if kind == "sdpa" else DotProductAttention
    args = dict(config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                attention_type="self")
    args.update(kwargs)
    return cls(**args)


def qkv(config, sq=12, sk=None, batch=3, seed=0):
    """Contiguous [s, b, heads, d] query and [s, b, groups, d] key/value leaves."""
    g = torch.Generator().manual_seed(seed)
    d, n, ng = config.kv_channels, config.num_attention_heads, config.num_query_groups
    sk = sq if sk is None else sk
    shapes = [(sq, batch, n, d), (sk, batch, ng, d), (sk, batch, ng, d)]
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def run(module, inputs, seed=1):
    """Output and input gradients of ``module`` for a fixed random output cotangent."""
    out = module(*inputs, None)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, inputs, cotangent)
    return out.detach(), grads


@pytest.mark.parametrize("groups, overrides, layer_number, scale", [
    (4, {}, 1, None),                                     # MHA
    (2, {}, 1, None),                                     # GQA, 2 query heads per group
    (1, {}, 1, None),                                     # MQA
    (4, dict(apply_query_key_layer_scaling=True), 3, None),  # megatron's /layer, *layer split
    (2, {}, 2, 0.37),                                     # explicit softmax_scale argument
])
def test_sdpa_equals_dot_product_attention(megatron_world, groups, overrides, layer_number, scale):
    config = attention_config(num_query_groups=groups, **overrides)
    inputs = qkv(config)
    got, got_grads = run(core_attention("sdpa", config, layer_number, softmax_scale=scale), inputs)
    want, want_grads = run(core_attention("megatron", config, layer_number, softmax_scale=scale),
                           inputs)
    assert got.shape == want.shape == (12, 3, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_single_query_attends_to_every_key(megatron_world):
    """KV-cache decoding (sq = 1): megatron builds no causal mask (fused_softmax.py:323)."""
    from megatron.core.transformer.enums import AttnMaskType

    config = attention_config(num_query_groups=2)
    inputs = qkv(config, sq=1, sk=7)
    got = core_attention("sdpa", config)(*inputs, None, attn_mask_type=AttnMaskType.no_mask)
    want = core_attention("megatron", config)(*inputs, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # is_causal=True would have aligned the query with the first key only
    first_key_only = inputs[2][:1].repeat_interleave(2, dim=2).reshape(1, 3, 64)
    assert not torch.allclose(got, first_key_only, atol=1e-3)


def build_model(core, seed=0, **overrides):
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec

    torch.manual_seed(seed)
    return MeshGPTModel(tiny_config("1+2R2+1", "mesh", **overrides), spec=local_block_spec(core))


def loss_and_grads(model, seed=0):
    tokens, positions = random_batch(model.config, seed=seed)
    logits = model(tokens, positions)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.roll(tokens, -1, 1).flatten())
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_with_sdpa_equals_model_with_dot_product_attention(megatron_world):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_mesh.model.attention import SDPAttention
    from megatron_mesh.model.layers import default_block_spec

    sdpa, dpa = build_model("sdpa").train(), build_model("megatron", seed=1).train()
    assert {type(layer.self_attention.core_attention) for layer in sdpa.decoder.layers} == {SDPAttention}
    assert {type(layer.self_attention.core_attention) for layer in dpa.decoder.layers} == {DotProductAttention}
    assert default_block_spec().layer.submodules.self_attention.submodules.core_attention is SDPAttention
    # same names (and no attention parameters): checkpoints load across, and so does the
    # dist-checkpointing layout
    assert sdpa.sharded_state_dict().keys() == dpa.sharded_state_dict().keys()
    dpa.load_state_dict(sdpa.state_dict(), strict=True)

    got_logits, got = loss_and_grads(sdpa)
    want_logits, want = loss_and_grads(dpa)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_attention_dropout(megatron_world):
    """Training with attention_dropout > 0 is stochastic in both; eval is deterministic and the
    two agree there (dropout 0 in training is covered by the model test above)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    sdpa = build_model("sdpa", attention_dropout=0.5)
    dpa = build_model("megatron", seed=1, attention_dropout=0.5)
    dpa.load_state_dict(sdpa.state_dict())
    tokens, positions = random_batch(sdpa.config)
    model_parallel_cuda_manual_seed(3)
    with torch.no_grad():
        for model in (sdpa, dpa):
            model.train()
            first, second = model(tokens, positions), model(tokens, positions)
            assert not torch.allclose(first, second, atol=1e-3), type(model)
        sdpa.eval(), dpa.eval()
        evaluated = sdpa(tokens, positions)
        assert torch.equal(evaluated, sdpa(tokens, positions))
        torch.testing.assert_close(evaluated, dpa(tokens, positions), rtol=1e-5, atol=1e-5)
        sdpa.train()
        assert not torch.allclose(evaluated, sdpa(tokens, positions), atol=1e-3)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_dropout_draws_from_the_tensor_parallel_rng_like_megatron(megatron_world, sequence_parallel):
    """DotProductAttention draws its masks in the TP tracker's fork unless sequence parallelism is
    on (dot_product_attention.py:218-222): TP ranks hold different heads, so different masks.
    On CPU the CUDA RNG is the CPU RNG (compat/cpu.py), so the default generator shows which
    state was used."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    config = attention_config()
    config.sequence_parallel = sequence_parallel  # only the flag matters here (TP is 1)
    module = core_attention("sdpa", config, attention_dropout=0.5).train()
    inputs = qkv(config)
    model_parallel_cuda_manual_seed(5)
    before = (torch.get_rng_state(), get_cuda_rng_tracker().get_states()["model-parallel-rng"])
    with torch.no_grad():
        dropped = module(*inputs, None)
    after = (torch.get_rng_state(), get_cuda_rng_tracker().get_states()["model-parallel-rng"])
    default_moved, tracker_moved = (not torch.equal(b, a) for b, a in zip(before, after))
    assert (default_moved, tracker_moved) == (sequence_parallel, not sequence_parallel)
    with torch.no_grad():
        assert not torch.allclose(dropped, module.eval()(*inputs, None), atol=1e-3)


@pytest.mark.parametrize("make, setting", [
    (lambda: core_attention("sdpa", attention_config(), attn_mask_type=_mask("padding")),
     "attn_mask_type=<AttnMaskType.padding"),
    (lambda: core_attention("sdpa", attention_config(), attention_type="cross"),
     "attention_type='cross'"),
    (lambda: core_attention("sdpa", attention_config(context_parallel_size=2)),
     "context_parallel_size=2"),
    (lambda: core_attention("sdpa", attention_config(window_size=(4, 0))), "window_size=\\(4, 0\\)"),
    (lambda: core_attention("sdpa", attention_config(softmax_type="off-by-one")),
     "softmax_type='off-by-one'"),
])
def test_unimplemented_settings_are_refused_at_construction(megatron_world, make, setting):
    with pytest.raises(ValueError, match=f"{setting}.* is not supported by SDPAttention"):
        make()


def _mask(name):
    from megatron.core.transformer.enums import AttnMaskType

    return AttnMaskType[name]


def test_unimplemented_inputs_are_refused_at_forward(megatron_world):
    from megatron.core.packed_seq_params import PackedSeqParams

    config = attention_config()
    module = core_attention("sdpa", config)
    q, k, v = qkv(config, sq=6)
    mask = torch.ones(3, 1, 6, 6, dtype=torch.bool).triu(1)
    with pytest.raises(ValueError, match="attention_mask .*attn_mask_type=AttnMaskType.padding"):
        module(q, k, v, mask, attn_mask_type=_mask("padding"))
    with pytest.raises(ValueError, match="attention_mask .*not supported by SDPAttention"):
        module(q, k, v, mask)
    with pytest.raises(ValueError, match="attn_mask_type=<AttnMaskType.arbitrary.*not supported"):
        module(q, k, v, None, attn_mask_type=_mask("arbitrary"))
    with pytest.raises(ValueError, match="attention_bias .*not supported by SDPAttention"):
        module(q, k, v, None, attention_bias=torch.zeros(1, 4, 6, 6))
    with pytest.raises(ValueError, match="packed_seq_params .*not supported by SDPAttention"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="sq=6, sk=4"):
        module(q, k[:4], v[:4], None)


def test_unknown_core_attention_is_refused():
    from megatron_mesh.model.layers import local_block_spec

    with pytest.raises(ValueError, match="core_attention='flash'.*'sdpa', 'megatron'"):
        local_block_spec("flash")
