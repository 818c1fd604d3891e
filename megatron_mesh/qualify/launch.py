"""Running ``tools/pretrain_mesh.py`` under torchrun from a check, within the check's budget."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import psutil

from megatron_mesh.qualify.profiles import Profile, TrainerModel
from megatron_mesh.training.logs import TrainerLog, parse_log

REPO = Path(__file__).resolve().parents[2]


class TrainerFailed(RuntimeError):
    """The trainer exited non-zero or ran out of time; the message names the log."""


@dataclass
class TrainerRun:
    log_path: Path
    log: TrainerLog
    text: str
    seconds: float


def trainer_command(profile: Profile, model: TrainerModel, overrides: Sequence[str],
                    nproc: int = 1) -> list:
    sets = [*profile.trainer_common, *model.overrides, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(REPO / "tools" / "pretrain_mesh.py"),
            "--config", str(REPO / model.config), *(["--cpu"] if profile.cpu else []),
            *[f"--set={item}" for item in sets]]


def _kill_tree(proc: subprocess.Popen) -> None:
    """torchrun's workers may run in sessions of their own: kill every descendant by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        child.kill()
    proc.kill()
    proc.wait()


def run_trainer(profile: Profile, model: TrainerModel, overrides: Sequence[str], log_path: Path,
                deadline: float, *, nproc: int = 1) -> TrainerRun:
    """Train; TrainerFailed (with the log's tail) on a non-zero exit or at the deadline."""
    cmd = trainer_command(profile, model, overrides, nproc)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if profile.cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # gloo ranks share the CPU cores
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise TrainerFailed(f"{model.label}: out of time after {time.time() - start:.0f} s "
                                f"(log {log_path})") from None
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise TrainerFailed(f"{model.label}: trainer exited with {proc.returncode} "
                            f"(log {log_path}):\n{tail}")
    return TrainerRun(log_path, parse_log(text), text, time.time() - start)
