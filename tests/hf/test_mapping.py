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
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.recurrence.layout import parse_layout

    with pytest.raises(CheckpointError, match="vanilla layouts only"):
        gpt_neox_to_megatron({}, parse_layout("1+2R2+1"))


def test_layer_count_mismatch_is_refused():
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.mapping import gpt_neox_to_megatron
    from megatron_mesh.recurrence.layout import parse_layout

    hf = GPTNeoXForCausalLM(hf_config(32, 2, 50, num_layers=3))
    with pytest.raises(CheckpointError, match="has 3 layers, layout=2 expects 2"):
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


# Between them every field of HF_NAMES is off its default (and off what MeshConfig fills in for
# it), so a field the export dropped or the import misread would come back different.
ROUND_TRIP = [
    ("1+2R3+1", "mesh", dict(buffer_slots=4, gelu_approximation="none", rotary_percent=0.5,
                             rotary_base=500, layernorm_epsilon=1e-6, init_method_std=0.01,
                             ffn_hidden_size=96, kv_channels=8, max_sequence_length=48,
                             scale_embeddings=False, vocab_size=100)),
    ("1+2R2+1", "linear_injection", dict(initial_state="random", initial_state_std=0.3,
                                         hidden_size=32, num_attention_heads=2, exit_gate=True)),
    ("1+2R2+1", "mesh", dict(layer_family="llama", num_query_groups=2, add_qkv_bias=True,
                             qk_layernorm=True, rope_scaling_factor=8.0, tie_embeddings=True,
                             rotary_base=500000.0)),
]


def test_every_exported_field_round_trips_export_and_import():
    """megatron -> HF config (as save_pretrained writes config.json) -> megatron section."""
    import dataclasses
    import json

    from megatron_mesh.config.model import HF_NAMES, MeshConfig
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.importer import model_section_from_hf
    from megatron_mesh.hf.mapping import hf_mesh_config_kwargs

    configs = [tiny_config(layout, scheme, **model) for layout, scheme, model in ROUND_TRIP]
    for cfg in configs:
        saved = json.loads(MegatronMeshConfig(**hf_mesh_config_kwargs(cfg)).to_json_string())
        assert set(HF_NAMES.values()) <= set(saved)
        back = MeshConfig.from_section(model_section_from_hf(saved))
        assert {n: getattr(back, n) for n in HF_NAMES} == {n: getattr(cfg, n) for n in HF_NAMES}
    defaults = {f.name: f.default for f in dataclasses.fields(MeshConfig)}
    unseen = [n for n in HF_NAMES  # model_section: the keys set, not those filled in
              if all(c.model_section().get(n, defaults[n]) == defaults[n] for c in configs)]
    assert not unseen, f"set {unseen} off their defaults in ROUND_TRIP, so the round trip can fail"


def test_the_twin_config_declares_only_exported_fields_and_hf_settings():
    """configuration_megatron_mesh.py stays self-contained: its explicit parameters are the
    exported fields' HF names (plus its declared HF settings), never a name the export lacks."""
    import inspect

    from megatron_mesh.config.model import HF_NAMES
    from megatron_mesh.hf.configuration_megatron_mesh import HF_SETTINGS, MegatronMeshConfig

    params = [p.name for p in inspect.signature(MegatronMeshConfig.__init__).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert set(HF_SETTINGS) <= set(params)
    assert set(params) - set(HF_SETTINGS) <= set(HF_NAMES.values())


def test_an_unknown_activation_or_a_mistyped_field_is_named():
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.importer import model_section_from_hf

    with pytest.raises(CheckpointError, match=r"hidden_act='relu': expected one of \['gelu', "):
        model_section_from_hf({"model_type": "megatron_mesh", "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="rotary_pct='0.5': expected float, got str"):
        model_section_from_hf({"model_type": "megatron_mesh", "rotary_pct": "0.5"})
    with pytest.raises(CheckpointError, match="buffer_slots=4.5: expected int, got float"):
        model_section_from_hf({"model_type": "megatron_mesh", "buffer_slots": 4.5})


def test_exit_gates_export_to_the_twin(megatron_world):
    """The twin's gates read what megatron's do (the final norm's output after t loop steps)
    and have its weights: lambda(t) equal for every token and step."""
    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config("1+1R3+1", "mesh", exit_gate=True)
    torch.manual_seed(0)
    ours = MeshGPTModel(cfg).eval()
    with torch.no_grad():
        for p in ours.decoder.exit_gate.parameters():
            p.normal_(0.0, 0.5)
    hf = build_hf_model(ours.state_dict(), cfg).eval()
    tokens, positions = random_batch(cfg)
    readouts = []
    hook = ours.decoder.final_layernorm.register_forward_hook(lambda m, i, out: readouts.append(out))
    with torch.no_grad():
        for t in (1, 2):
            ours(tokens, positions, num_loops=t)
            z = hf.model(tokens, num_loops=t)[0]  # [b, s, h], the final norm's output
            want = torch.sigmoid(ours.decoder.exit_gate.gates[t - 1](readouts[-1]).squeeze(-1)).t()
            got = torch.sigmoid(hf.model.exit_gate.gates[t - 1](z).squeeze(-1))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    hook.remove()
