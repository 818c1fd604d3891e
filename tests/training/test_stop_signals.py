"""Stopping a run by signal at any moment saves and records a requeueable stop
(megatron_mesh.training.stop_signals): the helper processes of a checkpoint save survive
torchrun's killpg, Ctrl-C saves like SIGTERM, and a signal before megatron's handler exists
is not lost."""

import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from megatron_mesh.training import exit_status
from trainer import ckpt_overrides, command, env, tracker, train

pytestmark = pytest.mark.slow  # real processes: torchrun, a multiprocessing manager

KILLED_GROUP = """
import os, signal, sys, time
import megatron_mesh  # CPU shims before megatron.core
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_mesh.training import stop_signals

if sys.argv[1] == "shielded":
    stop_signals.install([], save_on_signal=False)
signal.signal(signal.SIGTERM, lambda *_: None)  # the worker itself survives (megatron's handler)
queue = filesystem_async.get_write_results_queue()  # started by the first save
os.killpg(0, signal.SIGTERM)  # torchrun's shutdown: the worker's whole process group
time.sleep(1)
queue.put("written")
print(queue.get(timeout=10))
"""


@pytest.mark.parametrize("shield", ["shielded", "megatron's own"])
def test_the_write_results_manager_survives_the_workers_process_group_signal(shield):
    out = subprocess.run([sys.executable, "-c", KILLED_GROUP, shield], capture_output=True, text=True,
                         cwd=REPO, timeout=120, start_new_session=True)
    if shield == "shielded":
        assert out.returncode == 0 and out.stdout.strip() == "written", out.stderr[-2000:]
    else:  # the fault: the final save's results queue is gone (BrokenPipeError in a real save)
        assert out.returncode != 0 and re.search("BrokenPipe|ConnectionRefused|EOFError", out.stderr), out.stderr


ITERS = 2000  # the schedule of every run below: interrupted runs never reach it


def _overrides(save, **extra):
    return ckpt_overrides(save, **{"training.train_iters": ITERS, **extra})


def _signalled_run(save, sig, trigger, overrides):
    """Start a run, send ``sig`` to torchrun at the first line matching ``trigger``; the log."""
    proc = subprocess.Popen(command(save, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=env())
    lines, deadline = [], time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if re.search(trigger, line):
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines[-50:])
    lines += proc.stdout.readlines()
    proc.wait(timeout=180)
    return "".join(lines)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses of iterations 1-12 of the schedule every run below follows."""
    save = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    _, losses = train(save, _overrides(save, **{"training.exit_interval": 12}))
    return losses


MOMENTS = {  # name: (signal, torchrun output line that triggers it, extra overrides)
    "SIGTERM after a periodic save": (
        signal.SIGTERM, r"successfully saved checkpoint from iteration\s+4", {"checkpointing.interval": 2}),
    "SIGINT during an async save": (
        signal.SIGINT, r"scheduled an async checkpoint save at iteration\s+4",
        {"checkpointing.interval": 2, "checkpointing.async_save": "true"}),
    # printed by the tool before megatron is imported
    "SIGINT before megatron's handler": (signal.SIGINT, r"^\[mesh\] full log: ", {}),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_stop_signal_saves_records_a_requeue_and_resumes_exactly(tmp_path, moment, uninterrupted):
    sig, trigger, extra = MOMENTS[moment]
    save = tmp_path / "ckpt"
    log = _signalled_run(save, sig, trigger, _overrides(save, **extra))
    stopped_at = tracker(save)
    status = exit_status.read(save / "exit_status.json")
    assert (status.state, status.stop, status.requeue, status.iteration) == (
        "stopped", "signal", True, stopped_at), log[-3000:]
    assert f"[mesh] {sig.name}: the run saves a checkpoint" in log
    assert "error:" not in log and "BrokenPipeError" not in log, log[-3000:]
    assert 1 <= stopped_at <= 8, log[-3000:]

    log, resumed = train(save, _overrides(save, **{**extra, "training.exit_interval": stopped_at + 2}))
    assert resumed == {i: uninterrupted[i] for i in (stopped_at + 1, stopped_at + 2)}, log[-3000:]
