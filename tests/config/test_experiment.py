"""The typed experiment config (megatron_mesh/config/experiment.py): the one source of every key."""

import pytest

from conftest import REPO

from megatron_mesh.config import experiment
from megatron_mesh.config.yaml_file import SCHEMA, load_config_tree
from megatron_mesh.errors import ConfigError


def test_docs_configuration_md_is_generated_from_the_fields():
    generated = experiment.configuration_markdown()
    assert (REPO / "docs" / "configuration.md").read_text() == generated, (
        "docs/configuration.md is stale: python -m megatron_mesh.config.experiment > docs/configuration.md")
    for name in SCHEMA:
        assert f"## {name}" in generated
        for key in SCHEMA[name]:
            assert f"| `{key}` |" in generated, f"{name}.{key}"


def test_every_field_is_documented_and_the_schema_is_derived():
    from dataclasses import fields

    for name, cls in experiment.SECTIONS.items():
        assert SCHEMA[name] == tuple(f.name for f in fields(cls))
        for f in fields(cls):
            assert f.metadata["doc"], f"{name}.{f.name} has no meaning"


def typed(tmp_path, text, overrides=()):
    path = tmp_path / "run.yml"
    path.write_text(text)
    return experiment.parse_experiment(*load_config_tree(path, overrides))


BASE = "training: {seq_length: 8, micro_batch_size: 1, global_batch_size: 2, train_iters: 3}\noptimizer: {lr: 0.1}\n"


def test_defaults_types_and_choices_come_from_the_fields(tmp_path):
    exp = typed(tmp_path, BASE)
    assert (exp.optimizer.betas, exp.schedule.min_lr_ratio, exp.checkpointing.verify) == ([0.9, 0.95], 0.1, True)
    assert exp.training.seed == 1234 and exp.parallelism.tensor == 1
    with pytest.raises(ConfigError, match=r"--set training.seed=1.5: training.seed=1.5 has type float, "
                                          r"expected int"):
        typed(tmp_path, BASE, ["training.seed=1.5"])
    with pytest.raises(ConfigError, match=r"run.yml: precision.dtype='fp8': expected one of "
                                          r"\['bf16', 'fp16', 'fp32'\]"):
        typed(tmp_path, BASE + "precision: {dtype: fp8}\n")
    with pytest.raises(ConfigError, match="missing required key 'optimizer.lr'"):
        typed(tmp_path, BASE.replace("optimizer: {lr: 0.1}", ""))
    assert typed(tmp_path, BASE, ["data.path=[0.3, a, 0.7, b]"]).data.path == [0.3, "a", 0.7, "b"]


def test_one_to_one_keys_become_their_flags(tmp_path):
    exp = typed(tmp_path, BASE + "logging: {interval: 5}\nparallelism: {tensor: 2, sequence_parallel: true}\n")
    args = {flag: value for name in experiment.SECTIONS
            for flag, value in experiment.flag_args(getattr(exp, name))}
    assert args["log-interval"] == 5 and args["tensor-model-parallel-size"] == 2
    assert args["sequence-parallel"] is True and args["exit-signal-handler"] is True


def test_bounds_come_from_the_fields(tmp_path):
    """micro_batch_size 0 and lr -1 reached megatron's bare asserts; lr 1e39 torch's overflow."""
    B = experiment.Bounds
    assert [str(b) for b in (B(low=1), B(low=0, low_open=True), B(0, 1, high_open=True), B(high=2))] == [
        ">= 1", "> 0", "0 <= value < 1", "<= 2"]
    assert not any(B(low=0).holds(v) for v in (-1, float("inf"), float("nan")))
    with pytest.raises(ConfigError, match=r"run.yml: training.micro_batch_size=0: expected >= 1$"):
        typed(tmp_path, BASE.replace("micro_batch_size: 1", "micro_batch_size: 0"))
    with pytest.raises(ConfigError, match=r"--set optimizer.lr=1e39: optimizer.lr=1e\+39: expected 0 <= value <= "
                                          r"3.40282e\+38 \(megatron holds the learning rate in a float32 tensor\)"):
        typed(tmp_path, BASE, ["optimizer.lr=1e39"])
    assert typed(tmp_path, BASE, ["optimizer.lr=3e38"]).optimizer.lr == 3e38
