"""What RouterLog writes: router statistics for MeSH, the scheme's own scalars for the others."""

import math

import pytest
import torch

from conftest import random_batch, tiny_config


class Writer:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars[key] = (value, step)


@pytest.mark.parametrize("scheme", ["diagonal_injection", "mesh"])
def test_scheme_scalars_reach_the_log(megatron_world, monkeypatch, scheme):
    import megatron.training

    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.training.router_log import RouterLog

    writer = Writer()
    monkeypatch.setattr(megatron.training, "get_tensorboard_writer", lambda: writer)
    monkeypatch.setattr(megatron.training, "get_wandb_writer", lambda: None)
    model = MeshGPTModel(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(model.config)
    states = []
    with torch.no_grad():
        model(tokens, positions, states=states)
    log = RouterLog(enabled=True)
    log.logged_iteration = 7
    log.write(model, states)
    if scheme == "mesh":
        assert "mesh/router/step1/read_entropy" in writer.scalars
        assert not any(k.startswith("mesh/scheme/") for k in writer.scalars)
        return
    # Parcae's init: exp(-dt A) = sqrt(1/5) in every channel
    value, step = writer.scalars["mesh/scheme/spectral_radius"]
    assert step == 7 and value == pytest.approx(math.sqrt(1 / 5), rel=1e-6)
    assert writer.scalars["mesh/scheme/mean_dt"][0] == pytest.approx(-math.log(math.sqrt(1 / 5)), rel=1e-6)
