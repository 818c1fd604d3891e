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
