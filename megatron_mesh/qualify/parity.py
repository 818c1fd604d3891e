"""Check ``parity``: TP=2 (with SP) and PP=2 (splitting the core) train like one device.

Every run starts from one release checkpoint (written once, on the CPU) and trains
``parity_iters`` bf16 steps on the same data; lm loss and grad norm per step are read from
TensorBoard (Megatron prints the grad norm with 3 decimals only). Tolerance 1e-3 (loss) and
1e-2 (grad norm) relative: on a GPU, different GEMM shapes per layout pick different kernels,
so every bf16 element may round differently (u = 2^-8 each), not just the rare ones of a CPU
run (tests/parallel/test_parity.py holds the CPU runs to 3e-5 / 5e-4). A broken collective or
a missing gradient reduction moves the grad norm by percents and the losses by far more.
Needs 2 GPUs; on one GPU the check is skipped. The CPU stand-in runs the same code with gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

from megatron_mesh.qualify.context import Context
from megatron_mesh.qualify.launch import REPO, run_trainer
from megatron_mesh.qualify.profiles import Profile
from megatron_mesh.qualify.report import FAIL, PASS, CheckResult, SkipCheck, markdown_table

TOLERANCE = {"lm loss": 1e-3, "grad-norm": 1e-2}


def save_start(model_json: str, out: str) -> None:
    """The release checkpoint every run starts from (run on the CPU: ``start_checkpoint``)."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    config = MeshConfig.from_json(model_json, use_cpu_initialization=True)
    save_release_checkpoint(build_model(config, {}, ("",), seed=5), checkpoint_args(config, None),
                            out, force=True)


def start_checkpoint(ctx: Context, out: Path) -> Path:
    """Written in a CPU subprocess, so a GPU process group never handles CPU-built weights."""
    from megatron_mesh.config.model import section_json
    from megatron_mesh.config.yaml_file import load_config_tree

    model = ctx.profile.parity
    tree, _ = load_config_tree(REPO / model.config, [*model.overrides])
    code = ("import sys, megatron_mesh; from megatron_mesh.qualify.parity import save_start; "
            "save_start(sys.argv[1], sys.argv[2])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code, section_json(tree["model"]), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=max(1.0, ctx.remaining()))
    if done.returncode != 0:
        raise RuntimeError(f"writing the start checkpoint failed:\n{done.stderr[-2000:]}")
    return out


def scalars(tb_dir: Path) -> Dict[str, Dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in TOLERANCE}


def run_overrides(profile: Profile, start: Path, tensorboard: Path, layout=()) -> List[str]:
    return [*profile.parity_overrides, *layout, f"checkpointing.pretrained={start}",
            f"training.train_iters={profile.parity_iters}", "logging.interval=1",
            f"logging.tensorboard_dir={tensorboard}", "checkpointing.save=null"]


def train(ctx: Context, start: Path, name: str, nproc: int, layout=()) -> Dict[str, Dict[int, float]]:
    tb = ctx.out / "scratch" / "parity" / f"tb-{name}"
    run_trainer(ctx.profile, ctx.profile.parity, run_overrides(ctx.profile, start, tb, layout),
                ctx.out / "logs" / f"parity-{name}.log", ctx.deadline, nproc=nproc)
    return scalars(tb)


def check(ctx: Context) -> CheckResult:
    gpus = torch.cuda.device_count() if not ctx.profile.cpu else None
    if gpus is not None and gpus < 2:
        raise SkipCheck(f"{gpus} GPU: TP=2 and PP=2 parity over NCCL needs 2 or more")
    start = start_checkpoint(ctx, ctx.out / "scratch" / "parity" / "start")
    reference = train(ctx, start, "reference", 1)
    worst, rows, problems = {}, [], []
    steps = range(1, ctx.profile.parity_iters + 1)
    for name, (nproc, layout) in ctx.profile.parity_layouts.items():
        got = train(ctx, start, name, nproc, layout)
        for tag, rel in TOLERANCE.items():
            if sorted(got[tag]) != list(steps):
                problems.append(f"{name}: {tag} logged at {sorted(got[tag])}")
                continue
            errors = [abs(got[tag][s] / reference[tag][s] - 1) for s in steps]
            worst[f"{name} {tag}"] = max(errors)
            if max(errors) > rel:
                problems.append(f"{name}: {tag} off by {max(errors):.1e} (allowed {rel:g})")
        rows.append([name, *(f"{worst.get(f'{name} {t}', float('nan')):.1e}" for t in TOLERANCE)])
    table = markdown_table(["layout", "max rel. loss diff", "max rel. grad-norm diff"], rows)
    backend = "gloo (CPU stand-in)" if ctx.profile.cpu else "NCCL"
    summary = f"{backend}, {ctx.profile.parity_iters} bf16 steps vs 1 process: " + ", ".join(
        f"{k} {v:.1e}" for k, v in worst.items())
    details = {"reference": reference, "worst": worst, "tolerance": TOLERANCE}
    if problems:
        return CheckResult("parity", FAIL, "; ".join(problems), details=details, table=table)
    return CheckResult("parity", PASS, summary, details=details, table=table)
