import json
import math

import pytest

from conftest import tiny_config

from megatron_mesh.config.model import MeshConfig


def test_defaults_follow_pythia_and_the_paper():
    cfg = tiny_config("4+8R2+4", "mesh", hidden_size=64, num_attention_heads=4)
    assert cfg.num_layers == 24  # N_compute
    assert cfg.buffer_slots == 2 + 3  # K + 3
    assert cfg.scale_embeddings
    assert cfg.rotary_percent == 0.25 and cfg.layernorm_epsilon == 1e-5
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.add_bias_linear and cfg.normalization == "LayerNorm"


def test_depth_aware_output_init_uses_n_compute():
    import torch

    cfg = tiny_config("1+2R3+1", "base", hidden_size=256, init_method_std=0.02)
    w = torch.empty(256, 1024)
    torch.manual_seed(0)
    cfg.output_layer_init_method(w)
    expected = 0.02 / math.sqrt(2 * 8)  # N_compute = 1 + 2*3 + 1
    assert abs(w.std().item() - expected) / expected < 0.02


def test_scheme_aliases_and_combinations():
    assert tiny_config(scheme="anchor*").state_scheme == "anchor_star"
    assert tiny_config(scheme="anchor_star+residual").state_scheme == "residual+anchor_star"
    assert tiny_config("6", "vanilla").num_layers == 6


@pytest.mark.parametrize(
    "kwargs, field, detail",
    [
        (dict(layout="4+8R0+4"), "layout", "K must be >= 1"),
        (dict(layout="banana"), "layout", "expected"),
        (dict(layout=""), "layout", "required"),
        (dict(scheme="highway"), "state_scheme", "expected one of"),
        (dict(scheme="anchor+anchor"), "state_scheme", "distinct"),
        (dict(scheme="mesh+anchor"), "state_scheme", "expected one of"),
        (dict(layout="12", scheme="mesh"), "state_scheme", "'vanilla'"),
        (dict(layout="2+2R2+2", scheme="vanilla"), "state_scheme", "any scheme but"),
        (dict(buffer_slots=1), "buffer_slots", ">= 2"),
        (dict(buffer_slots=0), "buffer_slots", ">= 2"),
        (dict(scheme="anchor", buffer_slots=4), "buffer_slots", "only used by"),
        (dict(hidden_size=66), "hidden_size", "not divisible"),
        (dict(num_layers=5), "num_layers", "N_compute is 6"),
        (dict(gelu_approximation="fast"), "gelu_approximation", "expected one of"),
        (dict(rotary_percent=0.0), "rotary_percent", "expected"),
        (dict(fp8="hybrid"), "fp8", "not supported by the recursive block"),
        (dict(fp4="e2m1"), "fp4", "not supported by the recursive block"),
    ],
)
def test_bad_configuration_names_field_value_and_allowed(kwargs, field, detail):
    kwargs = dict(kwargs)
    layout = kwargs.pop("layout", "1+2R2+1")
    scheme = kwargs.pop("scheme", "mesh")
    with pytest.raises(ValueError) as err:
        tiny_config(layout, scheme, **kwargs)
    message = str(err.value)
    assert field in message and detail in message


def test_explicit_matching_num_layers_is_accepted():
    assert tiny_config("1+2R2+1", num_layers=6).num_layers == 6


def test_field_roles_are_read_from_the_fields():
    """The model section, the resume check and the args copy are derived from the field roles;
    re-declared megatron-core fields keep megatron's metadata and default (unless Pythia's)."""
    from dataclasses import fields

    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mesh.config.model import ARCHITECTURE_FIELDS, DERIVED_FIELDS, MODEL_KEYS, ROLE

    assert {"layout", "state_scheme", "hidden_size", "num_attention_heads"} <= set(ARCHITECTURE_FIELDS)
    assert set(ARCHITECTURE_FIELDS) <= set(MODEL_KEYS)
    assert {"pipeline_carry_width", "activation_func"}.isdisjoint(MODEL_KEYS)
    assert {"num_layers", "activation_func", "init_method"} <= set(DERIVED_FIELDS)
    ours = {f.name: f for f in fields(MeshConfig)}
    for base in fields(TransformerConfig):
        mine = ours[base.name]
        assert {k: v for k, v in mine.metadata.items() if k != ROLE} == dict(base.metadata)
        if base.name not in ("hidden_dropout", "attention_dropout", "layernorm_epsilon",
                             "cuda_graph_modules"):
            assert mine.default == base.default, base.name


@pytest.mark.parametrize("layout, scheme, model", [
    ("6", "vanilla", {}),  # mean_loops is filled with K = 0, which a section may not set
    ("1+2R3+1", "mesh", {}),  # buffer_slots filled with K + 3
    ("1+2R3+1", "mesh", dict(buffer_slots=4, ffn_hidden_size=96, kv_channels=8)),
    ("1+2R2+1", "linear_injection", dict(initial_state="random", initial_state_std=0.3,
                                         loop_depth="poisson", mean_loops=3.0, max_loops=4,
                                         loop_depth_per="token", backprop_loops=1)),
])
def test_model_section_rebuilds_the_config(layout, scheme, model):
    from megatron_mesh.config.model import MODEL_KEYS, section_json

    cfg = tiny_config(layout, scheme, **model)
    section = cfg.model_section()
    assert json.loads(cfg.to_json()) == section and cfg.to_json() == section_json(section)
    for again in (MeshConfig.from_section(section), MeshConfig.from_json(cfg.to_json())):
        assert {k: getattr(again, k) for k in MODEL_KEYS} == {k: getattr(cfg, k) for k in MODEL_KEYS}
        assert again.model_section() == section
    assert "num_layers" not in section and {**model, "layout": layout}.items() <= section.items()


def test_values_filled_from_other_keys_are_filled_anew_for_a_changed_section():
    """A section taken from a K = 2 model and given K = 4 gets K + 3 slots, not the old 5."""
    section = tiny_config("1+2R2+1", "mesh").model_section()
    assert "buffer_slots" not in section and "mean_loops" not in section
    changed = MeshConfig.from_section(dict(section, layout="1+2R4+1"))
    assert (changed.buffer_slots, changed.mean_loops) == (7, 4.0)


def test_a_section_saved_by_an_older_run_loads():
    """Checkpoints hold the JSON of the keys their YAML set, with the layout as written."""
    cfg = MeshConfig.from_json('{"hidden_size": 64, "layout": "1+2r2+1", "num_attention_heads": 4, '
                               '"state_scheme": "anchor*", "vocab_size": 96}')
    assert (cfg.layout, cfg.state_scheme, cfg.num_layers) == ("1+2R2+1", "anchor_star", 6)
    assert cfg.model_section()["layout"] == "1+2R2+1"


@pytest.mark.parametrize("make, message", [
    (lambda: MeshConfig.from_section({"layout": "2", "state_scheme": "vanilla", "hiden_size": 64}),
     "model section: unknown key 'hiden_size': did you mean 'hidden_size'?"),
    (lambda: MeshConfig.from_section({"layout": "2", "use_cpu_initialization": True}),
     "model section: unknown key 'use_cpu_initialization'"),
    (lambda: MeshConfig.from_json('{"layout": "2",'), "mesh_model='{\"layout\": \"2\",': not a model section in JSON"),
    (lambda: MeshConfig.from_json('["2"]'), "expected a JSON object of model keys, got list"),
    (lambda: tiny_config("4+8X2+4"), "layout='4+8X2+4' is not a valid layout"),
    (lambda: tiny_config(scheme="highway"), "state_scheme"),
    (lambda: tiny_config(buffer_slots=1), "buffer_slots=1 is invalid"),
])
def test_model_section_errors_are_config_errors(make, message):
    from megatron_mesh.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


def test_runtime_fields_yield_to_the_section():
    """megatron's arguments hold model keys too (hidden_size); the model section decides."""
    cfg = MeshConfig.from_section({"layout": "2", "state_scheme": "vanilla", "hidden_size": 64,
                                   "num_attention_heads": 4}, hidden_size=32, hidden_dropout=0.1)
    assert (cfg.hidden_size, cfg.hidden_dropout) == (64, 0.1)
    assert "hidden_dropout" in cfg.model_section()  # a model key: its value is the model's


def test_hf_names_are_read_from_the_fields():
    """Every architecture field is exported (under its own name unless Role.hf_name renames it);
    of the other fields only those that name an HF config key."""
    from megatron_mesh.config.model import ARCHITECTURE_FIELDS, HF_NAMES

    assert set(ARCHITECTURE_FIELDS) <= set(HF_NAMES)
    assert {k: v for k, v in HF_NAMES.items() if k != v} == {
        "max_sequence_length": "max_position_embeddings", "rotary_percent": "rotary_pct",
        "rotary_base": "rotary_emb_base", "gelu_approximation": "hidden_act",
        "ffn_hidden_size": "intermediate_size", "init_method_std": "initializer_range",
        "layernorm_epsilon": "layer_norm_eps", "num_query_groups": "num_key_value_heads",
        "tie_embeddings": "tie_word_embeddings"}
    assert {"loop_depth", "cycle_impl", "hidden_dropout", "num_layers"}.isdisjoint(HF_NAMES)
