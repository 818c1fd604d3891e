"""scripts/slurm/*.sbatch requeue a job when, and only when, the run's exit status asks for it.

The scripts run under bash with srun and scontrol replaced by stubs: srun writes the exit status
the real trainer would (megatron_mesh.training.exit_status) and exits with torchrun's code."""

import os
import signal
import subprocess
import time

import pytest

from conftest import REPO

SRUN = """#!/bin/bash
while [ $# -gt 0 ]; do
    if [ "$1" = --exit-status-file ]; then status=$2; fi
    shift
done
sleep "${FAKE_SLEEP:-0}"
if [ -n "$FAKE_STATUS" ]; then
    # the container script passes the path inside the container: /mesh-logs = SUBMIT/logs
    printf '%s' "$FAKE_STATUS" > "${status/#\\/mesh-logs/$SLURM_SUBMIT_DIR/logs}"
fi
exit "${FAKE_RC:-0}"
"""
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node1; else echo "$@" >> "$SCONTROL_CALLS"; fi
"""


def status_text(tmp_path, state, stop):
    from megatron_mesh.training import exit_status

    path = tmp_path / "status.json"
    exit_status.write(path, state, stop, save=None)
    return path.read_text()


def sbatch(tmp_path, script, status=None, rc=0, sleep=0, interrupt=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "scontrol-calls"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1",
           "SCONTROL_CALLS": str(calls), "FAKE_STATUS": status or "", "FAKE_RC": str(rc),
           "FAKE_SLEEP": str(sleep), "CONTAINER_IMAGE": "image.sqsh"}
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "slurm" / script), "config.yml"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if interrupt:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # what scancel does to the batch script
    out, _ = proc.communicate(timeout=60)
    requeued = calls.is_file() and "requeue 42" in calls.read_text()
    return proc.returncode, requeued, out


@pytest.mark.parametrize("script", ["pretrain.sbatch", "pretrain-container.sbatch"])
def test_requeues_a_stop_that_asks_for_it_and_nothing_else(tmp_path, script):
    preempted = status_text(tmp_path, "stopped", "signal")
    rc, requeued, out = sbatch(tmp_path, script, preempted, rc=1)  # torchrun exits 1 on SIGTERM
    assert requeued and rc == 0, out
    assert "asks to resume" in out

    for state, stop, code in (("finished", "finished", 0), ("stopped", "exit_interval", 0),
                              ("stopped", "rerun_limit", 1),  # the same device again and again
                              ("running", None, 1)):  # running: the run failed before a stop
        rc, requeued, out = sbatch(tmp_path, script, status_text(tmp_path, state, stop), rc=code)
        assert not requeued and rc == code, (state, out)
    rc, requeued, out = sbatch(tmp_path, script, None, rc=1)  # no status at all
    assert not requeued and rc == 1, out


def test_a_job_slurm_cancels_is_not_requeued_even_if_the_run_saved(tmp_path):
    preempted = status_text(tmp_path, "stopped", "signal")
    rc, requeued, out = sbatch(tmp_path, "pretrain.sbatch", preempted, rc=1, sleep=2, interrupt=True)
    assert not requeued and rc == 1, out
    assert "SLURM is ending the job" in out
