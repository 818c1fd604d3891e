"""The trainer's args -> MeshConfig path (megatron_mesh.training.providers) against the YAML's."""

import argparse

import pytest
import torch

from conftest import REPO


def trainer_config(overrides=()):
    """The MeshConfig the trainer's model provider builds for tiny-cpu.yml, from Megatron's parsed
    and validated arguments, as tools/pretrain_mesh.py makes them (one rank)."""
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from megatron_mesh.compat import cpu
    from megatron_mesh.training.arguments import add_mesh_arguments, megatron_argv
    from megatron_mesh.training.providers import mesh_config_from_args
    from megatron_mesh.yaml_config import load_config_tree

    argv = megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", overrides)) + cpu.trainer_args()
    parser = add_mesh_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(argv)
    args.rank, args.world_size = 0, 1
    validate_args(args)
    return mesh_config_from_args(args)


@pytest.mark.parametrize("overrides", [(), ("precision.dtype=bf16", "model.cycle_impl=eager",
                                            "model.hidden_dropout=0.1")])
def test_every_model_key_reaches_the_trainers_config(overrides):
    from megatron_mesh.yaml_config import load_config_tree, load_model_config

    tree, _ = load_config_tree(REPO / "configs/tiny-cpu.yml", overrides)
    expected = load_model_config(REPO / "configs/tiny-cpu.yml", overrides)
    got = trainer_config(overrides)
    for key in tree["model"]:
        assert getattr(got, key) == getattr(expected, key), key
    assert got.num_layers == expected.num_layers and got.pipeline_carry_width is None
    bf16 = "precision.dtype=bf16" in overrides
    assert (got.bf16, got.params_dtype) == (bf16, torch.bfloat16 if bf16 else torch.float32)
