"""tools/pretrain_mesh.py when a run cannot simply go on: a fault megatron's result validation
reproduces on the only device there is, and a load directory whose tracker was deleted. Real
torchrun processes on the CPU, one save directory through both."""

import subprocess

import pytest

from conftest import REPO
from megatron_mesh.checkpoint.paths import TRACKER
from megatron_mesh.training import exit_status
from trainer import ckpt_overrides, command, env, tracker, train

pytestmark = pytest.mark.slow  # real subprocesses: make test-fast skips them

# every result validation after the first step "fails", and reproduces in place: megatron saves
# the step before it and exits 16 to have it rerun on another GPU (on the CPU there is none)
INJECTED_FAULT = ["--rerun-mode", "validate_results", "--error-injection-rate", "1",
                  "--error-injection-type", "persistent_error"]


def run(tmp_path, overrides, passthrough=()):
    out = subprocess.run(command(tmp_path, overrides, passthrough=passthrough), capture_output=True,
                         text=True, cwd=REPO, env=env(), timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_a_fault_on_the_same_device_stops_requeueing_and_a_deleted_tracker_is_refused(tmp_path):
    save = tmp_path / "ckpt"
    settings = ckpt_overrides(save, **{"training.train_iters": 6, "checkpointing.interval": 100})
    seen = []
    for attempt in range(exit_status.RERUN_LIMIT):  # what the requeue script would start again
        (save / "exit_status.json").unlink(missing_ok=True)  # as scripts/slurm do before a start
        code, log = run(tmp_path, settings, INJECTED_FAULT)
        status = exit_status.read(save / "exit_status.json")
        seen.append((code != 0, status.stop, status.requeue, status.reruns, status.iteration))
        assert attempt == 0 or "Got rescheduled on the same GPU" in log, log[-3000:]
    assert seen == [(True, "rerun", True, 1, 1), (True, "rerun", True, 2, 1),
                    (True, "rerun_limit", False, 3, 1)]
    assert f"[mesh] error: {status.message}" in log
    assert "in iteration 2 that reproduced" in status.message
    # megatron rewrote the tracker whole: nothing of the write is left beside it
    assert sorted(p.name for p in save.iterdir() if "tracker" in p.name or TRACKER in p.name) == [TRACKER]

    # the tracker deleted: megatron would train from iteration 0 over the old run; refused
    (save / TRACKER).unlink()
    before = {p: p.stat().st_mtime_ns for p in (save / "iter_0000001").rglob("*")}
    code, log = run(tmp_path, settings)
    assert code != 0
    assert (f"error: {save}: no {TRACKER} beside its checkpoints (deleted, or left out of a copy): "
            f"megatron would start from iteration 0" in log
            and f"the newest that verifies is iter_0000001: write its number to the tracker (`echo 1 > "
                f"{save / TRACKER}`), or resume from it with `-- --ckpt-step 1`" in log), log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (save / "iter_0000001").rglob("*")} == before
    assert not (save / TRACKER).exists()

    # the fix it names resumes the run (validation off: the injected fault would stop it again)
    log, losses = train(tmp_path, settings, passthrough=["--ckpt-step", "1", "--rerun-mode", "disabled"])
    assert sorted(losses) == [2, 3, 4, 5, 6] and tracker(save) == 6
    status = exit_status.read(save / "exit_status.json")
    assert (status.stop, status.requeue, status.reruns) == ("finished", False, 0)
