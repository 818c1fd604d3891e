"""The FLOP count from the config alone equals the count over the real model's parameters."""

import pytest
import torch

from conftest import tiny_config


@pytest.mark.parametrize(
    "layout, scheme",
    [("3", "vanilla"), ("1+2R3+1", "base"), ("1+2R2+1", "mesh"), ("1+1+2+1", "mesh"),
     ("1+2R2+1", "static_comb"), ("1+2R2+1", "dynamic_comb")],
)
def test_config_matmul_count_equals_the_built_model(megatron_world, layout, scheme):
    from megatron_mesh.model import MeshGPTModel
    from megatron_mesh.stats import applied_matmul_weights, applied_matmul_weights_of_config

    cfg = tiny_config(layout, scheme, perform_initialization=False)
    with torch.device("meta"):
        model = MeshGPTModel(cfg)
    assert applied_matmul_weights(model) == applied_matmul_weights_of_config(cfg)
