#!/usr/bin/env python
"""Pretrain a megatron-mesh model with Megatron-LM's trainer (megatron.training.pretrain).

    torchrun --nproc-per-node 8 tools/pretrain_mesh.py --config configs/pythia-1.4b-4+8R2+4-mesh.yml \
        [--set training.train_iters=1000 ...] [-- --raw-megatron-flag value ...]

The YAML (see configs/README.md) becomes Megatron's arguments in one function
(megatron_mesh.training.arguments.megatron_argv); flags after `--` are passed to Megatron as
they are and win over the YAML. Launch with torchrun (single- or multi-node); the usual
environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK) is read by Megatron.
"""

import argparse
import contextlib
import os
import signal
import sys
import warnings
from pathlib import Path

from _bootstrap import cli  # plain Python: the repository on sys.path, the error shell

# Nothing heavy at module level: torch.distributed.checkpoint's first save starts a
# multiprocessing manager with the "spawn" method (megatron/core/dist_checkpointing/strategies/
# filesystem_async.py: get_write_results_queue), and a spawned child re-runs this file's top
# level as __mp_main__. Importing megatron here cost every run ~9 s at its first save (CPU).


def split_passthrough(argv):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.train_iters=100")
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU with gloo (tests, demos), even where GPUs are visible "
                             "(they are hidden from the run); required when no GPU is visible, so a "
                             "GPU node with a broken driver fails instead of silently using CPUs")
    parser.add_argument("--print-args", action="store_true",
                        help="print the Megatron arguments the config maps to and exit (needs no GPU; "
                             "with --cpu: those of the CPU run)")
    parser.add_argument("--full-console", action="store_true",
                        help="show megatron's whole output on the console (by default it goes to "
                             "the log file, logging.log_dir, and the console shows progress, "
                             "checkpoints, validation, warnings and errors)")
    parser.add_argument("--exit-status-file", default=None, metavar="PATH",
                        help="where the first rank records why the run stopped and whether to "
                             "requeue it (megatron_mesh/training/exit_status.py; default: "
                             "SAVE_DIR/exit_status.json when the run saves checkpoints)")
    return parser.parse_args(argv)


def hide_gpus() -> None:
    """``--cpu`` means the CPU wherever the run starts. CUDA reads CUDA_VISIBLE_DEVICES once, when
    torch first queries it (``import megatron_mesh`` does, to decide on the CPU shims), so hiding
    every GPU before that makes gloo, CPU initialization and the shims follow; without it a GPU
    machine would run the "CPU" run on CUDA (TE, NCCL, TF32) and put every rank on GPU 0."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        cli.fail("--cpu: CUDA was initialized before the GPUs could be hidden")


def stop_with_the_launcher() -> None:
    """torchrun starts each worker in its own session, so a signal to torchrun's process group
    misses the workers, and a torchrun killed outright (SIGKILL) leaves them training and
    saving. Have the kernel send this worker SIGTERM when its parent dies
    (PR_SET_PDEATHSIG): it then saves at the end of its iteration and stops like a pre-empted
    run. Linux; only under torchrun (TORCHELASTIC_RUN_ID is set for its workers)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        print(f"[mesh] warning: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): "
              f"this worker outlives a killed torchrun", file=sys.stderr, flush=True)
    elif os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def build_megatron_argv(config, overrides, passthrough, cpu_run=False):
    from megatron_mesh.compat import cpu
    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.training.arguments import check_passthrough, console_log_dir, megatron_argv

    tree, origins = load_config_tree(config, overrides)
    check_passthrough(passthrough)
    mode = (tree.get("logging") or {}).get("wandb_mode")
    if mode:
        os.environ.setdefault("WANDB_MODE", mode)
    argv = megatron_argv(tree, origins) + (cpu.trainer_args() if cpu_run else []) + [
        "--mesh-config-file", str(Path(config).resolve())
    ] + passthrough
    return argv, console_log_dir(tree, origins)


def run(megatron_args, early_signals, exit_status_file=None):
    import megatron_mesh  # noqa: F401  (CPU shims before megatron.core)
    from megatron_mesh.compat import cpu, wheel
    from megatron_mesh.training import megatron_fixes

    wheel.apply_trainer()
    cpu.apply_trainer()
    megatron_fixes.apply_trainer()
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_mesh.training import (exit_status, providers, resume, save_guard, save_lock, stop_signals,
                                        throughput)
    from megatron_mesh.training.arguments import add_mesh_arguments
    from megatron_mesh.training.router_log import RouterLog

    sys.argv = [sys.argv[0], *megatron_args]
    with cpu.trainer_context():
        args = parse_and_validate_args(extra_args_provider=add_mesh_arguments)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
            cfg = pretrain_cfg_container_from_args(args)
        resume.check_resume_model(args)  # CheckpointError, ConfigError: the shell reports them
        config = providers.mesh_config_from_args(args)
        if cpu.cuda_available() and not args.gradient_accumulation_fusion:
            print("[mesh] gradient accumulation fusion off (apex's fused_weight_gradient_mlp_cuda "
                  "is not installed, or --no-gradient-accumulation-fusion was passed)", flush=True)
        depth_tally = throughput.DepthTally()  # the forward steps' depth draws, for the log
        throughput.install(config, args, depth_tally)
        save_guard.install()
        stop_signals.install(early_signals, save_on_signal=args.exit_signal_handler)
        # a busy save directory, a failed or non-finite save, a damaged dataset: MeshErrors
        with _save_directory_lock(args, save_lock):  # before the status: a refused run writes none
            stops = exit_status.StopRecorder(_exit_status_path(exit_status_file, args), args)
            run_providers = providers.MeshProviders(RouterLog(enabled=args.mesh_router_metrics),
                                                    depth_tally)
            _pretrain_recording_the_stop(cfg, run_providers, stops)


def _pretrain_recording_the_stop(cfg, run_providers, stops) -> None:
    """megatron's pretrain, with why it stopped written where requeue scripts look."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from megatron_mesh.training.providers import train_valid_test_datasets_provider

    stops.install()
    try:
        pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
                 run_providers.forward_step, model_provider=run_providers.model_provider)
    except SystemExit as done:  # megatron's sys.exit after a stop's final save
        stops.exited(done.code)
        raise
    stops.finished()


def _exit_status_path(option, args):
    from megatron_mesh.training.exit_status import STATUS_FILE

    if option:
        return Path(option)
    return Path(args.save) / STATUS_FILE if args.save else None


def _save_directory_lock(args, save_lock):
    """The first rank locks the save directory for the run (megatron_mesh.training.save_lock)."""
    if args.save and args.rank == 0:
        return save_lock.exclusive_save_directory(args.save)
    return contextlib.nullcontext()


def record_stop_signals() -> list:
    """From the worker's first moment on, SIGTERM and SIGINT are recorded instead of killing
    it: megatron's handler, installed seconds later, is told of them and the run saves and
    stops at the end of an iteration like one signalled in training (every rank the same,
    megatron_mesh/training/stop_signals.py). Before any import of the package (seconds)."""
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


@cli.tool
def main(argv=None):
    early_signals = record_stop_signals()
    ours, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = parse_args(ours)
    stop_with_the_launcher()
    if args.cpu:
        hide_gpus()
    import megatron_mesh  # (CPU shims before megatron.core)
    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    from megatron_mesh.compat import cpu

    if not (args.cpu or args.print_args or cpu.cuda_available()):  # --print-args only prints
        cli.fail("no CUDA device is visible; pass --cpu to train on the CPU (tests, demos)")
    megatron_args, log_dir = build_megatron_argv(args.config, args.overrides, passthrough, args.cpu)
    if args.print_args:
        print(" ".join(megatron_args))
        return
    keep_console(args.full_console, log_dir)
    run(megatron_args, early_signals, args.exit_status_file)


def keep_console(full: bool, log_dir) -> None:
    """The compact console (megatron_mesh/training/console.py), before megatron.training is
    imported: its logging handler writes to the sys.stdout it finds then."""
    from megatron_mesh.training.console import Console

    console = Console(full=full)
    console.install()
    rank = int(os.environ.get("RANK", "0"))
    path = console.keep_log_in(log_dir, rank)
    if rank == 0:
        print(f"[mesh] full log: {path.parent / 'rank-*.log' if path else 'not kept (set logging.log_dir)'}"
              + ("" if full else "; this console is compact (--full-console shows everything)"), flush=True)


if __name__ == "__main__":
    main()
