"""Exit gates in MeshGPTModel: the objective of one forward equals the one computed from K
separate t-step forwards and the paper's formulas; stage II trains the gates alone; the config
refuses what it cannot run."""

import pytest
import torch

from conftest import REPO, random_batch, tiny_config
from megatron_mesh.errors import ConfigError
from megatron_mesh.recurrence.exit_gate import ExitLoss, ExitObjective

SCHEMES = ["mesh", "linear_injection", "anchor"]


def build(cfg):
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    return MeshGPTModel(cfg)


def reference_objective(model, tokens, positions, labels):
    """From K forwards with num_loops = t (each the t-step readout: a loop step depends only on
    the steps before it) and the stage-I/II formulas written out with explicit products."""
    cfg, K = model.config, model.config.num_loops
    readouts, losses = [], []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda m, i, out: readouts.append(out))
    for t in range(1, K + 1):
        losses.append(model(tokens, positions, labels=labels, num_loops=t))  # [b, s]
    hook.remove()
    lam = [torch.sigmoid(gate(z).squeeze(-1).t().float())  # [b, s]
           for gate, z in zip(model.decoder.exit_gate.gates, readouts)]
    survive, p = torch.ones_like(lam[0]), []
    for value in lam:
        p.append(value * survive)
        survive = survive * (1 - value)
    p = torch.stack(p + [survive])  # [K, b, s]
    L = torch.stack(losses).float()
    if cfg.exit_training == "expected_loss":
        return (p * L).sum(0) + cfg.exit_entropy_weight * (p * p.log()).sum(0)
    improvement = (L[:-1] - L[1:]).clamp_min(0).detach()
    w = torch.sigmoid(cfg.exit_gate_sharpness * (improvement - cfg.exit_gate_margin))
    lam = torch.stack(lam)
    return -(w * (1 - lam).log() + (1 - w) * lam.log()).mean(0)


def grads(model, loss):
    model.zero_grad()
    loss.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("training", ["expected_loss", "gate_only"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_one_forward_equals_the_t_step_reference(megatron_world, scheme, training):
    cfg = tiny_config("1+1R3+1", scheme, exit_gate=True, exit_training=training)
    model = build(cfg)
    with torch.no_grad():  # gates that start uniform would ignore which readout they read
        for p in model.decoder.exit_gate.parameters():
            p.normal_(0.0, 0.3)
    tokens, positions = random_batch(cfg)
    labels = torch.roll(tokens, -1, 1)
    out = model(tokens, positions, labels=labels)
    assert isinstance(out, ExitLoss) and out.objective.shape == tokens.shape
    want = reference_objective(model, tokens, positions, labels)
    torch.testing.assert_close(out.objective, want, rtol=1e-5, atol=1e-6)
    got_grads, want_grads = grads(model, out.objective), grads(model, want)
    assert got_grads.keys() == want_grads.keys()
    for name in got_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # the K-step loss reported beside it is the plain forward's
    torch.testing.assert_close(out.final_loss, model(tokens, positions, labels=labels, num_loops=3))
    assert ((out.exit_step >= 1) & (out.exit_step <= 3)).all()


def test_gate_only_trains_the_gates_alone(megatron_world):
    model = build(tiny_config("1+1R3+1", "mesh", exit_gate=True, exit_training="gate_only"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"decoder.exit_gate.gates.{i}.{w}" for i in range(2) for w in ("weight", "bias")}


def test_gates_start_with_a_uniform_exit_distribution(megatron_world):
    cfg = tiny_config("1+1R4+1", "mesh", exit_gate=True)
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    out = model(tokens, positions, labels=tokens)
    torch.testing.assert_close(out.exit_step, torch.full_like(out.exit_step, 2.5), atol=1e-4, rtol=0)


def test_logits_without_labels_and_other_depths_are_the_plain_model(megatron_world):
    cfg = tiny_config("1+1R2+1", "mesh", exit_gate=True)
    model = build(cfg)
    tokens, positions = random_batch(cfg)
    assert model(tokens, positions).shape == (*tokens.shape, cfg.vocab_size)
    assert isinstance(model(tokens, positions, labels=tokens, num_loops=1), torch.Tensor)


@pytest.mark.parametrize("overrides, message", [
    (dict(layout="1+1R1+1"), "K >= 2"),
    (dict(loop_depth="poisson", state_scheme="mesh_shared"), "does not combine with loop_depth='poisson'"),
    (dict(backprop_loops=1, state_scheme="mesh_shared"), "does not combine"),
    (dict(pipeline_model_parallel_size=2), "not supported: every loop step's exit needs the coda"),
    (dict(exit_training="stage2"), "exit_training='stage2': expected one of"),
])
def test_config_refuses_what_exit_gates_cannot_run(overrides, message):
    section = dict(layout="1+1R3+1", scheme="mesh", exit_gate=True)
    section.update(overrides)
    layout, scheme = section.pop("layout"), section.pop("state_scheme", section.pop("scheme"))
    section.pop("scheme", None)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(layout, scheme, **section)


def test_trainer_refuses_exit_gates_under_pipeline_parallelism_before_launch():
    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.training.arguments import megatron_argv

    with pytest.raises(ConfigError, match="model.exit_gate.* with .*parallelism.pipeline.*under pipeline"):
        megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", [
            "model.exit_gate=true", "parallelism.pipeline=2"]))


def test_flops_count_every_readout_and_stage_two_runs_the_model_forward_only():
    from megatron_mesh.model.stats import train_flops_per_token

    plain = train_flops_per_token(tiny_config("1+1R3+1", "mesh"), 16)
    stage1 = train_flops_per_token(tiny_config("1+1R3+1", "mesh", exit_gate=True), 16)
    stage2 = train_flops_per_token(tiny_config("1+1R3+1", "mesh", exit_gate=True,
                                               exit_training="gate_only"), 16)
    assert stage2 < plain < stage1
    assert stage2 > plain / 3  # the whole forward, readouts included
    assert ExitObjective.of(tiny_config("1+1R3+1", "mesh", exit_gate=True)).entropy_weight == 0.1
