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
    from megatron_mesh.checkpoint import manifest as checkpoint_manifest
    from megatron_mesh.errors import CheckpointError
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
    check_resume_model(run(layout="1+2r2+1", state_scheme="mesh"))  # the same, spelled otherwise
    with pytest.raises(CheckpointError, match=r"iter_0000004: the checkpoint's model differs from the config's "
                                         r"model section \(state_scheme: checkpoint 'mesh', config 'anchor'; "
                                         r"buffer_slots: checkpoint 5, config None\)"):
        check_resume_model(run(state_scheme="anchor", buffer_slots=None))


def schedule_run(tmp_path, monkeypatch, overrides=(), passthrough=()):
    """Megatron's arguments for tiny-cpu.yml resuming from ``tmp_path``, set as megatron's global
    args (what the trainer's check finds after parse_and_validate_args)."""
    from megatron.training import global_vars

    from conftest import REPO
    from megatron_mesh.config.yaml_file import load_config_tree
    from test_arguments import megatron_parser
    from megatron_mesh.training.arguments import megatron_argv

    sets = [f"checkpointing.save={tmp_path}", *overrides]
    args = megatron_parser().parse_args(megatron_argv(*load_config_tree(REPO / "configs/tiny-cpu.yml", sets))
                                        + list(passthrough))
    args.start_weight_decay = args.end_weight_decay = args.weight_decay  # as validate_args sets them
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    return args


def test_another_schedule_is_refused_before_loading_naming_the_keys_and_the_flags(tmp_path, monkeypatch):
    """megatron's scheduler load (optimizer_param_scheduler.py:333) asserted "class input value 32
    and checkpointvalue 16 for total number of iterations do not match" once the model was built."""
    from megatron_mesh.training.resume import _check_schedule, this_runs_schedule

    ckpt = tmp_path / "iter_0000020"
    schedule_run(tmp_path, monkeypatch)
    saved = {"opt_param_scheduler": this_runs_schedule()}  # what a run of tiny-cpu.yml saves
    assert saved["opt_param_scheduler"]["lr_decay_steps"] == 40 * 8
    _check_schedule(schedule_run(tmp_path, monkeypatch), ckpt, saved)  # the same run resumes
    longer = schedule_run(tmp_path, monkeypatch, ["training.train_iters=80"])
    with pytest.raises(ValueError) as err:
        _check_schedule(longer, ckpt, saved)
    assert str(err.value).startswith(
        f"{ckpt}: this run's optimizer schedule differs from the checkpoint's (lr_warmup_steps: "
        f"checkpoint 32.0, this run 64.0, from schedule.warmup_fraction of the decay steps or "
        f"schedule.warmup_iters x training.global_batch_size; lr_decay_steps: checkpoint 320, this run 640, "
        f"from schedule.decay_iters (default: training.train_iters) x training.global_batch_size, "
        f"--lr-decay-iters; wd_incr_steps: checkpoint 320, this run 640, from training.train_iters x "
        f"training.global_batch_size), and megatron resumes only the same schedule. Pass "
        f"`-- --override-opt_param-scheduler` to continue with this run's")
    with pytest.raises(ValueError, match=r"\(max_lr: checkpoint 0.003, this run 0.001, from optimizer.lr, --lr; "
                                         r"min_lr: .*from optimizer.lr x schedule.min_lr_ratio, --min-lr\)"):
        _check_schedule(schedule_run(tmp_path, monkeypatch, ["optimizer.lr=1e-3"]), ckpt, saved)
    for settled in (["--override-opt_param-scheduler"], ["--use-checkpoint-opt_param-scheduler"],
                    ["--no-load-optim"], ["--finetune"]):
        _check_schedule(schedule_run(tmp_path, monkeypatch, ["training.train_iters=80"], settled), ckpt, saved)
    _check_schedule(longer, tmp_path / "release", saved)  # a converted model starts a fresh schedule
    _check_schedule(longer, tmp_path / "elsewhere" / "iter_0000020", saved)  # pretrained: megatron fine-tunes
