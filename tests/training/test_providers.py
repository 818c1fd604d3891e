"""The trainer's args -> MeshConfig path (megatron_mesh.training.providers) against the YAML's."""

import argparse

import pytest
import torch

from conftest import REPO


def trainer_config(overrides=(), passthrough=()):
    """The MeshConfig the trainer's model provider builds for tiny-cpu.yml, from Megatron's parsed
    and validated arguments, as tools/pretrain_mesh.py makes them (one rank)."""
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from megatron_mesh.compat import cpu
    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.training.arguments import add_mesh_arguments, megatron_argv
    from megatron_mesh.training.providers import mesh_config_from_args

    argv = (megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", overrides)) + cpu.trainer_args()
            + list(passthrough))
    parser = add_mesh_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(argv)
    args.rank, args.world_size = 0, 1
    validate_args(args)
    return mesh_config_from_args(args)


@pytest.mark.parametrize("overrides", [(), ("precision.dtype=bf16", "model.cycle_impl=eager",
                                            "model.hidden_dropout=0.1")])
def test_every_model_key_reaches_the_trainers_config(overrides):
    from megatron_mesh.config.yaml_file import load_config_tree, load_model_config

    tree, _ = load_config_tree(REPO / "configs/tiny-cpu.yml", overrides)
    expected = load_model_config(REPO / "configs/tiny-cpu.yml", overrides)
    got = trainer_config(overrides)
    for key in tree["model"]:
        assert getattr(got, key) == getattr(expected, key), key
    assert got.num_layers == expected.num_layers and got.pipeline_carry_width is None
    bf16 = "precision.dtype=bf16" in overrides
    assert (got.bf16, got.params_dtype) == (bf16, torch.bfloat16 if bf16 else torch.float32)


def test_a_megatron_flag_after_dashes_sets_a_model_key_the_section_leaves_unset():
    """--mesh-model carries the YAML's section as written, not every model key, so
    `-- --hidden-dropout 0.1` still reaches the model (and the section's own keys still win)."""
    assert trainer_config(passthrough=["--hidden-dropout", "0.1"]).hidden_dropout == 0.1
    assert trainer_config(["model.hidden_dropout=0.2"], ["--hidden-dropout", "0.1"]).hidden_dropout == 0.2


def test_the_microbatch_counter_gives_each_rank_its_rows_of_the_global_batch(monkeypatch):
    """Rank r of dp holds the mbs rows at r * mbs of each dp * mbs (megatron's pretraining
    sampler); chunks count apart; a rerun of the step (megatron's rerun state machine) replays
    the same rows; a new iteration starts over."""
    from megatron_mesh.training import providers

    monkeypatch.setattr(providers, "get_num_microbatches", lambda: 2)
    monkeypatch.setattr(providers.parallel_state, "get_data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(providers.parallel_state, "get_data_parallel_rank", lambda: 1)
    counter = providers.MicrobatchCounter()
    rows = [counter.rows(5, 3) for _ in range(4)]  # two micro-batches, then their rerun
    assert rows == [range(3, 6), range(9, 12), range(3, 6), range(9, 12)]
    assert counter.rows(5, 3, chunk=1) == range(3, 6)
    assert counter.rows(6, 3) == range(3, 6)


def test_exit_loss_reports_masked_token_means():
    """The exit objective trains; the log reports each exit quantity as a masked token mean."""
    from megatron_mesh.recurrence.exit_gate import ExitLoss
    from megatron_mesh.training.providers import exit_loss_func

    mask = torch.tensor([[1.0, 1.0, 0.0]])
    exits = ExitLoss(objective=torch.tensor([[1.0, 3.0, 100.0]]), expected_loss=torch.tensor([[2.0, 4.0, 9.0]]),
                     exit_step=torch.tensor([[1.0, 2.0, 9.0]]), entropy=torch.tensor([[0.5, 0.7, 9.0]]),
                     final_loss=torch.tensor([[1.5, 3.5, 9.0]]))
    loss, tokens, report = exit_loss_func(mask, exits, exits.objective)
    assert loss.item() == 4.0 and tokens.item() == 2
    means = {k: (v[0] / v[1]).item() for k, v in report.items()}
    assert means == pytest.approx({"lm loss": 3.0, "exit objective": 2.0, "lm loss at K": 2.5,
                                   "exit step": 1.5, "exit entropy": 0.6})
