"""The test-time-compute frontier (evaluation/exits.py) on a tiny random twin: fixed depths are
the plain forward, policies that always or never fire are the shallowest and deepest fixed
depth, and the savings sentences read the table right."""

import math

import pytest
import torch

from megatron_mesh.evaluation import exits
from megatron_mesh.evaluation.exits import Point


def twin(exit_gate=False, layout="1+1R3+1", scheme="mesh"):
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

    torch.manual_seed(0)
    config = MegatronMeshConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                intermediate_size=64, layout=layout, state_scheme=scheme,
                                max_position_embeddings=32, exit_gate=exit_gate)
    return MegatronMeshForCausalLM(config).eval()


DOCS = [list(range(1, 20)), [5, 9, 2, 7, 7, 1, 3, 30, 41, 12, 8], [3, 4]]


def plain_nll(model, num_loops):
    from megatron_mesh.evaluation.perplexity import nll_sum, window_batches

    total, tokens = 0.0, 0
    for inputs, labels in window_batches(DOCS, 8, 2):
        logits = model(input_ids=inputs, use_cache=False, num_loops=num_loops).logits
        total, tokens = total + nll_sum(logits, labels), tokens + labels.numel()
    return total / tokens


def test_fixed_depths_and_policies_that_always_or_never_fire():
    model = twin()
    points = [Point("fixed", 1), Point("fixed", 3), Point("entropy", 1e9), Point("entropy", -1.0),
              Point("kl", 1e-3)]
    report = exits.frontier(model, DOCS, 8, points, batch_size=2)
    rows = {r["label"]: r for r in report["rows"]}
    assert report["tokens"] == 18 + 10 + 1
    for t in (1, 3):
        assert rows[f"fixed {t}"]["mean_nll"] == pytest.approx(plain_nll(model, t), rel=1e-12)
        assert rows[f"fixed {t}"]["mean_steps"] == t
    assert rows["entropy 1e+09"]["mean_nll"] == pytest.approx(rows["fixed 1"]["mean_nll"], rel=1e-6)
    assert rows["entropy 1e+09"]["mean_steps"] == 1
    assert rows["entropy -1"]["mean_nll"] == pytest.approx(rows["fixed 3"]["mean_nll"], rel=1e-6)
    assert rows["entropy -1"]["mean_steps"] == 3
    assert 2 <= rows["kl 0.001"]["mean_steps"] <= 3  # KL compares two steps: none exits at 1
    assert rows["fixed 3"]["tokens_per_steps"] == [0, 0, 29]
    assert rows["entropy 1e+09"]["tokens_per_steps"] == [29, 0, 0]
    kl = rows["kl 0.001"]
    assert kl["tokens_per_steps"][0] == 0 and sum(kl["tokens_per_steps"]) == 29
    assert sum(n * t for t, n in enumerate(kl["tokens_per_steps"], 1)) / 29 == pytest.approx(kl["mean_steps"])
    # 1 prelude + 3 steps x 1 core layer + the coda once, or once per step for a policy
    assert rows["fixed 3"]["layer_applications"] == 1 + 3 + 1
    assert rows["entropy -1"]["layer_applications"] == 1 + 3 + 3


def test_default_points_offer_the_gate_only_to_gated_models():
    assert {p.kind for p in exits.default_points(twin())} == {"fixed", "kl"}
    gated = exits.default_points(twin(exit_gate=True), kl=())
    assert [p.label for p in gated] == ["fixed 1", "fixed 2", "fixed 3", "gate 0.3", "gate 0.5",
                                        "gate 0.7", "gate 0.9"]


def test_savings_name_the_cheapest_fixed_depth_as_good():
    report = {"rows": [
        {"kind": "fixed", "label": "fixed 1", "mean_nll": 3.0, "mean_steps": 1.0},
        {"kind": "fixed", "label": "fixed 2", "mean_nll": 2.5, "mean_steps": 2.0},
        {"kind": "fixed", "label": "fixed 4", "mean_nll": 2.0, "mean_steps": 4.0},
        {"kind": "kl", "label": "kl 0.01", "mean_nll": 2.4, "mean_steps": 2.5},
        {"kind": "gate", "label": "gate 0.5", "mean_nll": 1.9, "mean_steps": 3.0},
    ]}
    lines = exits.savings(report)
    assert lines[0].endswith("fixed 4 (loss 2.0000) is the cheapest fixed depth as good: 37.5% fewer steps")
    assert lines[1].endswith("lower than every fixed depth")
    report["rows"].append({"kind": "kl", "label": "kl 1", "mean_nll": 2.9, "mean_steps": 2.4})
    assert exits.savings(report)[-1].endswith("fixed 2 (loss 2.5000) is the cheapest fixed depth as good: "
                                              "20.0% more steps")


def test_generation_reports_steps_and_speed():
    model = twin()
    prompts = [torch.tensor([[3, 4, 5, 6]])]
    rows = exits.generation(model, prompts, [Point("fixed", 2), Point("entropy", 1e9)], new_tokens=3)
    assert [r["tokens"] for r in rows] == [3, 3]
    assert [r["mean_steps"] for r in rows] == [2, 1]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) for r in rows)


def test_a_model_without_a_loop_is_refused(tmp_path):
    from megatron_mesh.errors import ConfigError

    model = twin(layout="3", scheme="vanilla")
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a recursive model"):
        exits.twin_model(tmp_path)
