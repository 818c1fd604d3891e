"""A vanilla megatron-mesh model with weights from a random HF GPTNeoXForCausalLM: same logits."""

import math

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from conftest import random_batch, tiny_config
from reference import hf_config


@pytest.mark.parametrize("gelu, hf_act", [("tanh", "gelu_pytorch_tanh"), ("none", "gelu")])
def test_vanilla_logits_equal_hf_gpt_neox(megatron_world, gelu, hf_act):
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config("3", "vanilla", gelu_approximation=gelu)
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(
        hf_config(cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, hf_act, cfg.num_layers)
    )
    hf.eval()
    assert hf.config.use_parallel_residual and not hf.config.tie_word_embeddings
    model = MeshGPTModel(cfg).eval()
    state = gpt_neox_to_megatron(hf.state_dict(), cfg.parsed_layout, math.sqrt(cfg.hidden_size))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)

    tokens, positions = random_batch(cfg, seq=24)
    with torch.no_grad():
        ours = model(tokens, positions)
        theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-4, diff


def test_mismatched_activation_is_detected(megatron_world):
    """The comparison is sensitive: erf-GELU weights in a tanh-GELU model do not match."""
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config("2", "vanilla", gelu_approximation="tanh")
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(
        hf_config(cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, "gelu", cfg.num_layers)
    ).eval()
    model = MeshGPTModel(cfg).eval()
    state = gpt_neox_to_megatron(hf.state_dict(), cfg.parsed_layout, math.sqrt(cfg.hidden_size))
    model.load_state_dict(state, strict=False)
    tokens, positions = random_batch(cfg)
    with torch.no_grad():
        assert (model(tokens, positions) - hf(tokens).logits).abs().max() > 1e-6


def test_recursive_layouts_are_refused():
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.recurrence.layout import parse_layout

    with pytest.raises(ValueError, match="vanilla layouts only"):
        gpt_neox_to_megatron({}, parse_layout("1+2R2+1"))


def test_layer_count_mismatch_is_refused():
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.recurrence.layout import parse_layout

    hf = GPTNeoXForCausalLM(hf_config(32, 2, 50, num_layers=3))
    with pytest.raises(ValueError, match="has 3 layers, layout=2 expects 2"):
        gpt_neox_to_megatron(hf.state_dict(), parse_layout("2"))


def test_gpt_neox_round_trip_is_bit_identical(megatron_world):
    """Pythia -> megatron-mesh (no embedding scale, as Pythia trained) -> GPT-NeoX names."""
    from megatron_mesh.hf.mapping import gpt_neox_names, gpt_neox_output_name, gpt_neox_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config("2", "vanilla", scale_embeddings=False)
    torch.manual_seed(1)
    hf = GPTNeoXForCausalLM(
        hf_config(cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, num_layers=2)
    ).eval()
    original = {k: v for k, v in hf.state_dict().items() if "rotary" not in k and "masked_bias" not in k}
    ours = MeshGPTModel(cfg).eval()
    ours.load_state_dict(gpt_neox_to_megatron(original, cfg.parsed_layout), strict=False)
    back = gpt_neox_names(ours.state_dict(), cfg.parsed_layout, output_name=gpt_neox_output_name(original))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    tokens, positions = random_batch(cfg)
    with torch.no_grad():
        assert (ours(tokens, positions) - hf(tokens).logits).abs().max() < 1e-4


def test_both_names_of_the_output_layer_map_and_a_missing_one_is_named():
    """transformers 4.x's GPT-NeoX module and Pythia's files say embed_out, 5.x's module lm_head."""
    from megatron_mesh.hf.mapping import GPT_NEOX_OUTPUT_NAMES, gpt_neox_name_pairs, gpt_neox_to_megatron
    from megatron_mesh.recurrence.layout import parse_layout

    layout = parse_layout("1")
    for output in GPT_NEOX_OUTPUT_NAMES:
        state = {theirs: torch.full((1,), float(i)) for i, (_, theirs) in
                 enumerate(gpt_neox_name_pairs(layout, output))}
        assert torch.equal(gpt_neox_to_megatron(state, layout)["output_layer.weight"], state[output])
    del state["lm_head.weight"]
    with pytest.raises(KeyError, match="one output layer, embed_out.weight or lm_head.weight; "
                                       "this one holds neither"):
        gpt_neox_to_megatron(state, layout)
