"""Running tools/pretrain_mesh.py under real torchrun processes (CPU, gloo) from tests."""

import os
import re
import subprocess
import sys

from conftest import REPO

CONFIG = REPO / "configs" / "tiny-cpu.yml"
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.eE+-]+)")


def command(tmp_path, overrides=(), nproc=1, passthrough=()):
    sets = [f"--set={o}" for o in overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(REPO / "tools" / "pretrain_mesh.py"), "--config", str(CONFIG), "--cpu", *sets,
        *(["--", *passthrough] if passthrough else []),
    ]


def env(threads=1):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def train(tmp_path, overrides=(), nproc=1, passthrough=(), timeout=400, extra_env=None):
    out = subprocess.run(command(tmp_path, overrides, nproc, passthrough), capture_output=True,
                         text=True, cwd=REPO, env={**env(), **(extra_env or {})}, timeout=timeout)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log, {int(i): float(v) for i, v in LOSS.findall(log)}


def ckpt_overrides(save_dir, **extra):
    items = {"checkpointing.save": str(save_dir), "logging.interval": 1, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def tracker(save_dir):
    return int((save_dir / "latest_checkpointed_iteration.txt").read_text().strip())


def corrupt_a_weight(ckpt_dir, nbytes=256):
    """Overwrite ``nbytes`` inside a model weight of a torch_dist iteration directory with 0xff
    (NaN in fp32 and bf16), the file's size unchanged; returns the data file's path."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(ckpt_dir)).read_metadata().storage_data
    index, item = next((i, s) for i, s in storage.items() if i.fqn.endswith("linear_fc1.weight"))
    assert item.length >= nbytes, (index.fqn, item.length)
    path = ckpt_dir / item.relative_path
    with open(path, "r+b") as f:
        f.seek(item.offset + item.length // 2)
        f.write(b"\xff" * nbytes)
    return path
