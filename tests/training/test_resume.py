"""Checks before loading a checkpoint (megatron_mesh.training.resume)."""

from argparse import Namespace
from pathlib import Path

import pytest

from megatron_mesh.training.resume import _check_optimizer_layout

CKPT = Path("/ckpt/iter_0000100")


def common(tp, pp, sharding):
    return {"args": Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
            "content_metadata": {"distrib_optim_sharding_type": sharding}}


def run_args(tp=1, pp=1, distributed=True, no_load_optim=False, finetune=False):
    return Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                     use_distributed_optimizer=distributed, no_load_optim=no_load_optim,
                     finetune=finetune)


def test_dp_reshardable_optimizer_state_refuses_another_tp_or_pp_with_what_to_do():
    with pytest.raises(ValueError) as err:
        _check_optimizer_layout(run_args(tp=1, pp=1), CKPT, common(1, 2, "dp_reshardable"))
    message = str(err.value)
    assert str(CKPT) in message and "TP=1, PP=2" in message and "not at TP=1, PP=1" in message
    assert "--no-load-optim" in message and "checkpointing.optimizer_reshardable: true" in message


@pytest.mark.parametrize("args, saved", [
    (run_args(tp=2, pp=1), common(2, 1, "dp_reshardable")),  # same TP/PP (DP may differ)
    (run_args(tp=1), common(1, 2, "fully_reshardable")),  # saved reshardable
    (run_args(tp=1, no_load_optim=True), common(1, 2, "dp_reshardable")),  # weights only
    (run_args(tp=1, finetune=True), common(1, 2, "dp_reshardable")),
    (run_args(tp=1, distributed=False), common(1, 2, "dp_reshardable")),  # megatron decides
])
def test_loadable_layouts_pass(args, saved):
    _check_optimizer_layout(args, CKPT, saved)


def test_a_checkpoint_of_another_model_is_refused_naming_each_field(tmp_path, megatron_world):
    """The save directory holds a 1+2R2+1 MeSH model (B=5); a config asking for B=4 and the
    anchor scheme must not load it (megatron itself compares only layers, hidden size, heads)."""
    import json

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from conftest import tiny_config
    from megatron_mesh import checkpoint_manifest
    from megatron_mesh.training.resume import check_resume_model

    section = {"layout": "1+2R2+1", "state_scheme": "mesh", "buffer_slots": 5, "hidden_size": 64,
               "num_attention_heads": 4, "vocab_size": 96}
    saved_args = Namespace(mesh_model=json.dumps(section), tensor_model_parallel_size=1,
                           pipeline_model_parallel_size=1)
    ckpt = tmp_path / "iter_0000004"
    ckpt.mkdir()
    state = {"args": saved_args, "w": ShardedTensor.from_rank_offsets("w", torch.zeros(2))}
    dist_checkpointing.save(state, str(ckpt))
    checkpoint_manifest.write(ckpt, rank=0, world_size=1)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    assert tiny_config().layout == section["layout"]

    def run(**model):
        return Namespace(load=str(tmp_path), ckpt_step=None, rank=0, world_size=1,
                         mesh_skip_checkpoint_verification=False, mesh_model=json.dumps({**section, **model}),
                         use_distributed_optimizer=False, no_load_optim=False, finetune=False,
                         tensor_model_parallel_size=1, pipeline_model_parallel_size=1)

    check_resume_model(run())  # the same model
    with pytest.raises(ValueError, match=r"iter_0000004: the checkpoint's model differs from the config's "
                                         r"model section \(state_scheme: checkpoint 'mesh', config 'anchor'; "
                                         r"buffer_slots: checkpoint 5, config None\)"):
        check_resume_model(run(state_scheme="anchor", buffer_slots=None))
