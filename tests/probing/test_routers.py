"""MeSH router statistics: Eq. 7's unrolled coefficients rebuild the model's own loop states."""

import math

import pytest
import torch

from conftest import random_batch, tiny_config


@pytest.fixture(scope="module")
def mesh_run(megatron_world):
    """A random 1+2R2+1 MeSH model with sharp routers (logits far from uniform) and the states
    of one forward pass."""
    from megatron_mesh.model.gpt import MeshGPTModel

    config = tiny_config("1+2R2+1", "mesh")
    torch.manual_seed(0)
    model = MeshGPTModel(config).eval()
    with torch.no_grad():
        for param in model.decoder.scheme.parameters():
            param.normal_(0.0, 2.0)
    tokens, positions = random_batch(config, batch=2, seq=16)
    states = []
    with torch.no_grad():
        model(tokens, positions, states=states)
    return model, dict(states)


def test_eq7_coefficients_rebuild_every_loop_state(mesh_run):
    from megatron_mesh.probing.routers import (effective_coefficients, reconstruct,
                                               routing_weights, sources)

    model, states = mesh_run
    routing = routing_weights(model.decoder.scheme, states)
    assert [r.step for r in routing] == [-1, 0, 1]
    coefficients = effective_coefficients(routing)
    for r, coef in zip(routing, coefficients):
        target = states[f"h{r.step + 1}"]  # [s, b, h]
        rebuilt = reconstruct(coef, sources(states, r.step))
        torch.testing.assert_close(rebuilt, target, rtol=0, atol=1e-5)
    # not vacuous: the routers are far from uniform and the loop states differ
    assert (states["h2"] - states["h1"]).abs().max() > 0.1
    assert routing[1].read.max() > 0.9


def test_coefficients_of_hand_built_routing():
    """B = 2. transition: write prelude to slot 1, read half/half -> h0 = emb/2 + prelude/2.
    step 0: write core0 to slot 0, read slot 1 -> h1 = prelude.
    step 1: write core1 to slots 0/1 as 1/4, 3/4, read slot 0 -> h2 = emb + core0 + core1/4."""
    from megatron_mesh.probing.routers import StepRouting, effective_coefficients, reconstruct
    from megatron_mesh.recurrence.mesh import buffer_read, buffer_write, initial_buffer

    def w(*values):
        return torch.tensor(values, dtype=torch.float64).view(1, 1, -1)  # [s=1, b=1, B]

    routing = [StepRouting(-1, w(0, 1), w(0.5, 0.5)), StepRouting(0, w(1, 0), w(0, 1)),
               StepRouting(1, w(0.25, 0.75), w(1, 0))]
    got = [{k: float(v) for k, v in c.items()} for c in effective_coefficients(routing)]
    assert got == [{"emb": 0.5, "prelude": 0.5},
                   {"emb": 0.0, "prelude": 1.0, "core0": 0.0},
                   {"emb": 1.0, "prelude": 0.0, "core0": 1.0, "core1": 0.25}]

    # the same numbers drive mesh.py's buffer to the same states
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
         for k in ("emb", "prelude", "core0", "core1")}
    buffer = initial_buffer(x["emb"], 2)
    for r, coef, written in zip(routing, effective_coefficients(routing), ("prelude", "core0", "core1")):
        buffer = buffer_write(buffer, x[written], r.write)
        torch.testing.assert_close(reconstruct(coef, x), buffer_read(buffer, r.read))


def test_entropy_usage_histogram():
    from megatron_mesh.probing.routers import argmax_usage, entropy, histogram

    for slots in (2, 5):
        uniform = torch.full((3, 2, slots), 1.0 / slots)
        one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 1], [1, 1], [0, 0]]), slots).float()
        assert torch.allclose(entropy(uniform), torch.full((3, 2), math.log(slots), dtype=torch.float64))
        assert torch.equal(entropy(one_hot), torch.zeros(3, 2, dtype=torch.float64))
        usage = argmax_usage(one_hot)
        assert usage[:2].tolist() == [0.5, 0.5] and usage.sum() == 1
        counts = histogram(one_hot, bins=4)  # [B, bins]: weight 1 in the top bin, 0 in the bottom
        assert counts[0].tolist() == [3, 0, 0, 3] and counts[1].tolist() == [3, 0, 0, 3]
        assert counts.sum(dim=1).tolist() == [6] * slots


def test_router_summary_matches_the_statistics(mesh_run, megatron_world):
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.probing.routers import (RouterStats, effective_coefficients, entropy,
                                               router_summary, routing_weights)

    model, states = mesh_run
    summary = {k: v.item() for k, v in router_summary(model, list(states.items())).items()}
    keys = {k.split("/", 2)[2] for k in summary if k.startswith("mesh/step1/")}
    assert keys == {"read_entropy", "read_entropy_norm", "read_slot_usage_max", "write_entropy",
                    "write_entropy_norm", "write_slot_usage_max", "coef_emb", "coef_prelude",
                    "coef_core0", "coef_core1"}
    assert {k.split("/")[1] for k in summary} == {"transition", "step0", "step1"}
    routing = routing_weights(model.decoder.scheme, states)
    coef = effective_coefficients(routing)
    assert summary["mesh/step0/coef_core0"] == pytest.approx(float(coef[1]["core0"].mean()))
    assert summary["mesh/transition/read_entropy"] == pytest.approx(float(entropy(routing[0].read).mean()))
    assert summary["mesh/step1/read_entropy_norm"] == pytest.approx(
        summary["mesh/step1/read_entropy"] / math.log(model.config.buffer_slots))

    stats = RouterStats(model.decoder.scheme)
    stats.add(states)
    step1 = stats.summary()["steps"][2]
    assert step1["label"] == "step1" and step1["coefficients"]["sources"] == ["emb", "prelude", "core0", "core1"]
    assert step1["coefficients"]["mean"][3] == pytest.approx(float(coef[2]["core1"].mean()))
    assert step1["coefficients"]["std"][3] == pytest.approx(float(coef[2]["core1"].std(correction=0)))
    assert step1["read"]["mean"] == pytest.approx(routing[2].read.mean(dim=(0, 1)).tolist())
    assert [sum(row) for row in step1["write"]["histogram"]] == pytest.approx([1.0] * 5)

    base = MeshGPTModel(tiny_config("1+2R2+1", "anchor")).eval()
    assert router_summary(base, list(states.items())) == {}
