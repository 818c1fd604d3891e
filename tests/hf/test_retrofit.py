"""Retrofitted recurrence (hf/retrofit.py): a pretrained Llama's layers as a looped model that
at one loop step is the pretrained model without the dropped layers."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_batch
from registry import LOOPED

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
KEPT = (0, 2, 3, 5)  # --layers 0,2-3,5: prelude 0, core 2-3, coda 5; layers 1 and 4 dropped
LAYERS = "0,2-3,5"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    source = tmp_path_factory.mktemp("retrofit") / "llama"
    hf.save_pretrained(source)
    return hf, source


def pruned(hf):
    """The pretrained model without the dropped layers, in transformers: the independent reference."""
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_hidden_layers": len(KEPT)})).eval()
    state = {}
    for key, tensor in hf.state_dict().items():
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index not in KEPT:
                continue
            key = key.replace(f"model.layers.{index}.", f"model.layers.{KEPT.index(index)}.", 1)
        state[key] = tensor
    model.load_state_dict(state, strict=True)
    return model


def retrofitted(source, out, scheme):
    from megatron_mesh.checkpoint.reader import load_checkpoint, saved_model_config
    from megatron_mesh.hf.importer import retrofit
    from megatron_mesh.model.gpt import MeshGPTModel

    done = retrofit(source, out, layout="1+2R3+1", layers=LAYERS, state_scheme=scheme)
    state, common = load_checkpoint(str(done.path))
    model = MeshGPTModel(saved_model_config(common["args"])).eval()
    model.load_state_dict(state, strict=False)
    return done, model


@pytest.mark.parametrize("scheme", LOOPED)
def test_one_loop_step_is_the_pruned_model_where_the_scheme_says_so(megatron_world, tmp_path,
                                                                     pretrained, scheme):
    hf, source = pretrained
    done, model = retrofitted(source, tmp_path / "ckpt", scheme)
    assert done.dropped == (1, 4) and str(done.selection) == LAYERS
    tokens, positions = random_batch(model.config, seq=32)
    with torch.no_grad():
        ours = model(tokens, positions, num_loops=1)
        reference = pruned(hf)(tokens).logits
    gap = (ours - reference).abs().max().item()
    if done.exact:
        assert gap < 1e-5, gap
    else:  # the claim is honest: the scheme's own initialisation computes something else
        assert gap > 1e-3, gap


def test_the_exact_schemes_are_bit_identical_to_the_pruned_stack(megatron_world, tmp_path, pretrained):
    """base, additive_injection, static_comb and dynamic_comb at one step are a vanilla megatron
    model of the kept layers, bit for bit (the same ops, the scheme adding exact zeros or ones)."""
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.hf.importer import megatron_state_from_hf, model_section_from_hf, read_hf_directory
    from megatron_mesh.hf.retrofit import LayerSelection, retrofit_state
    from megatron_mesh.model.gpt import MeshGPTModel

    hf, source = pretrained
    hf_config, hf_state = read_hf_directory(source)
    config = MeshConfig.from_section(model_section_from_hf(hf_config), use_cpu_initialization=True)
    full = megatron_state_from_hf(hf_config, hf_state, config)
    keep = LayerSelection(KEPT, (), ())  # all kept layers as a 4-layer vanilla prelude
    stack_config = MeshConfig.from_section({**config.model_section(), "layout": str(len(KEPT))},
                                           use_cpu_initialization=True)
    stack = MeshGPTModel(stack_config).eval()
    stack.load_state_dict(retrofit_state(full, keep), strict=False)
    tokens, positions = random_batch(config, seq=32)
    exact = []
    for scheme in ("base", "additive_injection", "static_comb", "dynamic_comb"):
        done, model = retrofitted(source, tmp_path / scheme, scheme)
        with torch.no_grad():
            exact.append(torch.equal(model(tokens, positions, num_loops=1), stack(tokens, positions)))
    assert exact == [True] * 4


def test_the_default_selection_is_the_papers(megatron_world):
    from megatron_mesh.hf.retrofit import LayerSelection
    from megatron_mesh.recurrence.layout import parse_layout

    tinyllama = LayerSelection.default(parse_layout("4+8R4+4"), 22)
    assert str(tinyllama) == "0-3,10-17,18-21" and tinyllama.dropped(22) == (4, 5, 6, 7, 8, 9)
    assert str(LayerSelection.default(parse_layout("2+4R4+2"), 16)) == "0-1,10-13,14-15"
    assert LayerSelection.parse("0-3,10-17,18-21") == tinyllama


@pytest.mark.parametrize("layout, layers, message", [
    ("4+8R4+4", None, "16 distinct layers, the source model has 6"),
    ("1+2R3+1", "0,1-3", "expected three ranges"),
    ("1+2R3+1", "0,2-3,3", "expected distinct layers"),
    ("1+2R3+1", "0,2-4,5", r"1\+3\+1 layers, layout=1\+2R3\+1 takes 1\+2\+1"),
    ("1+2R3+1", "0,3-2,5", "runs backwards"),
    ("1+2+2+1", None, "a retrofit makes a tied looped model"),
])
def test_a_bad_selection_is_named(megatron_world, tmp_path, pretrained, layout, layers, message):
    from megatron_mesh.errors import ConfigError
    from megatron_mesh.hf.importer import retrofit

    with pytest.raises(ConfigError, match=message):
        retrofit(pretrained[1], tmp_path / "out", layout=layout, layers=layers)
    assert not (tmp_path / "out").exists()
