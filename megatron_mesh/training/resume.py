"""Before megatron loads anything: find the checkpoint it will load, verify it, and refuse one
whose model differs from the one the config builds.

megatron's own check (checkpointing.check_checkpoint_args) compares num_layers, hidden size and
heads only; a different layout of the same depth, state scheme, embedding scale or activation
would load without error (or fail deep in torch.distributed.checkpoint) and train a different
model than the one that was saved.

megatron loads the iteration its tracker names, and without a tracker starts from iteration 0:
a load directory whose tracker was deleted (or left out of a copy) would train afresh and its
saves overwrite the old run's. So a load directory holding a complete save but no tracker is
refused, naming its iterations, the newest that verifies and how to go on (write the tracker,
`-- --ckpt-step N`, or a new save directory), as an empty or garbled tracker is; one holding
only unfinished saves (the first save of a run killed half way) starts afresh, saying so.
Refused rather than resumed from the newest intact iteration: the tracker is what megatron (and
GPT-NeoX) users steer a run by, a guess could resume past a checkpoint they meant to drop and
its saves replace newer, damaged iterations someone may still want, and a refused requeued job
leaves ``running`` in its exit status, so it is not started again until someone decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_mesh.checkpoint.paths import (checkpoint_way_out, incomplete_files,
                                            iteration_dir, iteration_path, iterations, read_tracker,
                                            untracked, verify)
from megatron_mesh.checkpoint.reader import saved_model_config
from megatron_mesh.config.model import ARCHITECTURE_FIELDS, MeshConfig
from megatron_mesh.errors import CheckpointError

HOW_TO_LOAD = "resume from it with `-- --ckpt-step {iteration}`"


def checkpoint_to_load(args) -> Optional[Path]:
    """The checkpoint directory megatron's load_checkpoint will read, or None (fresh start).
    CheckpointError for a tracker megatron would misread or miss (see the module docstring)."""
    hashes = not args.mesh_skip_checkpoint_verification
    step = getattr(args, "ckpt_step", None) or None  # megatron ignores --ckpt-step 0
    pretrained = getattr(args, "pretrained_checkpoint", None)
    for directory in (args.load, pretrained):
        if not directory or not Path(directory).is_dir():
            continue
        # megatron reads the tracker even with --ckpt-step (only rewriting it helps); without
        # one it loads --ckpt-step from the load directory, unless a pretrained one is named
        if read_tracker(directory, how_to_load=None, hashes=hashes) is not None or (
                step and directory == args.load and not pretrained):
            return iteration_dir(directory, step, HOW_TO_LOAD, hashes)
        if directory == args.load:
            _refuse_untracked_checkpoints(directory, hashes, args.rank)
    return None


def _refuse_untracked_checkpoints(directory, hashes: bool, rank: int) -> None:
    found = iterations(directory)
    complete = [n for n in found if (iteration_path(directory, n) / "metadata.json").is_file()
                and not incomplete_files(iteration_path(directory, n))]
    if complete:
        raise CheckpointError(
            f"{untracked(directory)}: megatron would start from iteration 0 and its saves would "
            f"overwrite them. {checkpoint_way_out(directory, HOW_TO_LOAD, hashes)}. To start a new "
            f"run instead, give it another checkpointing.save (or remove those directories)")
    if found and rank == 0:
        names = ", ".join(iteration_path(directory, n).name for n in found)
        print(f"[mesh] {untracked(directory)}; its iteration directories ({names}) are unfinished "
              f"saves (no complete torch_dist checkpoint): starting from iteration 0, the next "
              f"saves replace them", flush=True)


def check_resume_model(args) -> None:
    """CheckpointError naming each field where the checkpoint's model and the config's differ,
    or when its distributed-optimizer state cannot load at this run's TP/PP."""
    ckpt = checkpoint_to_load(args)
    if ckpt is None:
        return
    # each rank hashes its share of the files: N ranks read the checkpoint once together
    verify(ckpt, HOW_TO_LOAD, "--set checkpointing.verify=false", share=(args.rank, args.world_size),
           hashes=not args.mesh_skip_checkpoint_verification)
    import warnings

    from megatron.core.dist_checkpointing import load_common_state_dict

    with warnings.catch_warnings():  # reading one small object, not a distributed load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        common = load_common_state_dict(str(ckpt))
    _check_optimizer_layout(args, ckpt, common)
    _check_schedule(args, ckpt, common)
    saved = common.get("args")
    if getattr(saved, "mesh_model", None) is None:
        return  # not written by megatron-mesh: megatron's own checks apply
    ours = MeshConfig.from_json(args.mesh_model, use_cpu_initialization=True)
    theirs = saved_model_config(saved)
    differ = [f"{f}: checkpoint {getattr(theirs, f)!r}, config {getattr(ours, f)!r}"
              for f in ARCHITECTURE_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if differ:
        raise CheckpointError(f"{ckpt}: the checkpoint's model differs from the config's model section "
                              f"({'; '.join(differ)}); see {ckpt.parent / 'model.yml'} if it was converted")


def _check_optimizer_layout(args, ckpt: Path, common: dict) -> None:
    """megatron's default distributed-optimizer layout (dp_reshardable) loads at another DP size
    but not at another TP/PP, and its error then names a deprecated flag
    (training/checkpointing.py:2250). Say what to do instead."""
    saved = common.get("args")
    sharding = (common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if (saved is None or sharding != "dp_reshardable" or args.no_load_optim or args.finetune
            or ckpt.name == "release"):
        return
    then = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size)
    now = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if then != now and args.use_distributed_optimizer:
        raise CheckpointError(
            f"{ckpt}: its distributed-optimizer state was saved at TP={then[0]}, PP={then[1]} in "
            f"megatron's default layout, which loads at another data-parallel size only, not at "
            f"TP={now[0]}, PP={now[1]}. Resume at TP={then[0]}, PP={then[1]}; or load the weights "
            f"with a fresh optimizer (`-- --no-load-optim`); and save with "
            f"checkpointing.optimizer_reshardable: true to move between layouts later")


SCHEDULE_SETTINGS = {  # OptimizerParamScheduler.state_dict() entry -> the keys (flags) that set it
    "max_lr": "optimizer.lr, --lr",
    "min_lr": "optimizer.lr x schedule.min_lr_ratio, --min-lr",
    "lr_warmup_steps": "schedule.warmup_fraction of the decay steps or schedule.warmup_iters x "
                       "training.global_batch_size",
    "lr_decay_steps": "schedule.decay_iters (default: training.train_iters) x training.global_batch_size, "
                      "--lr-decay-iters",
    "lr_decay_style": "schedule.style, --lr-decay-style",
    "start_wd": "optimizer.weight_decay, --start-weight-decay",
    "end_wd": "optimizer.weight_decay, --end-weight-decay",
    "wd_incr_steps": "training.train_iters x training.global_batch_size",
    "wd_incr_style": "--weight-decay-incr-style",
}


def _check_schedule(args, ckpt: Path, common: dict) -> None:
    """megatron's scheduler load asserts that this run's learning-rate and weight-decay schedule
    is the checkpoint's unless told which one wins (optimizer_param_scheduler.py:333,
    _check_and_set): a resume with another training.train_iters, lr or warmup stops there,
    after the model is built, naming neither the keys nor the flags that settle it. Say both
    before anything loads; this run's values come from megatron's own scheduler builder."""
    saved = common.get("opt_param_scheduler")
    resuming = args.load and ckpt.parent.resolve() == Path(args.load).resolve()  # else fine-tuning
    if (saved is None or not resuming or ckpt.name == "release" or args.finetune or args.no_load_optim
            or getattr(args, "override_opt_param_scheduler", False)
            or getattr(args, "use_checkpoint_opt_param_scheduler", False)):
        return
    ours = this_runs_schedule()
    differ = [f"{name}: checkpoint {saved[name]!r}, this run {ours[name]!r}, from {settings}"
              for name, settings in SCHEDULE_SETTINGS.items() if name in saved and saved[name] != ours[name]]
    if differ:
        raise CheckpointError(
            f"{ckpt}: this run's optimizer schedule differs from the checkpoint's ({'; '.join(differ)}), "
            f"and megatron resumes only the same schedule. Pass `-- --override-opt_param-scheduler` "
            f"to continue with this run's, `-- --use-checkpoint-opt_param-scheduler` to keep the "
            f"checkpoint's (training.train_iters may still change how long it trains), or restore "
            f"the settings it was saved with")


def this_runs_schedule() -> dict:
    """The scheduler state megatron's training builds for this run's arguments (get_args())."""
    from types import SimpleNamespace

    from megatron.training.training import get_optimizer_param_scheduler

    return get_optimizer_param_scheduler(SimpleNamespace(param_groups=[])).state_dict()
