"""scripts/device/gpu-check.sh, the one device command: what it leaves in $OUT, its deadline and
exit status, with a stub interpreter in place of the GPU machine's python3 (the real run is
`make test-image`: the same script with --tiny in a copy of the GPU image)."""

import json
import subprocess
import tarfile

from conftest import REPO

SCRIPT = REPO / "scripts" / "device" / "gpu-check.sh"

# python3 as the script calls it: pip and -c succeed; gpu_check.py writes a report and 30 logs
# (more files than a device call returns), then exits with $STUB_STATUS after $STUB_SLEEP s
STUB = """#!/bin/bash
echo "$@" >> "$CALLS"
case "$*" in
  *gpu_check.py*)
    while [ $# -gt 0 ]; do
      case "$1" in --out) out=$2;; --budget-s) echo "budget $2" >> "$CALLS";; esac; shift
    done
    mkdir -p "$out/logs"
    for i in $(seq 30); do echo "log $i" > "$out/logs/run-$i.log"; done
    echo '{"passed": false}' > "$out/report.json"; echo '# report' > "$out/report.md"
    sleep "${STUB_SLEEP:-0}"
    exit "${STUB_STATUS:-0}";;
esac
"""


def run(tmp_path, *args, wheels=True, **env):
    kit, out, calls = tmp_path / "kit", tmp_path / "out", tmp_path / "calls"
    kit.mkdir(exist_ok=True)
    if wheels:
        (kit / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    python = tmp_path / "python3"
    python.write_text(STUB)
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "KIT": str(kit), "OUT": str(out),
           "SITE": str(tmp_path / "site"), "CALLS": str(calls), **env}
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    return done, out, calls.read_text() if calls.exists() else ""


def test_five_files_come_back_and_the_checks_status_is_the_exit_status(tmp_path):
    done, out, calls = run(tmp_path, "--tiny", STUB_STATUS="1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "logs.tar.gz", "report.json",
                                                     "report.md", "versions.txt"]
    assert json.loads((out / "report.json").read_text()) == {"passed": False}
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert len([m for m in logs.getmembers() if m.isfile()]) == 30
    assert "install -q --disable-pip-version-check --no-index --no-deps" in calls
    gpu_check = next(line for line in calls.splitlines() if "gpu_check.py" in line)
    assert gpu_check.endswith("--tiny")  # the arguments reach gpu_check
    budget = int(next(line for line in calls.splitlines() if line.startswith("budget")).split()[1])
    assert 400 < budget < 540  # the checks' budget ends inside the 540 s deadline


def test_the_deadline_stops_the_checks_and_keeps_the_report(tmp_path):
    done, out, _ = run(tmp_path, STUB_SLEEP="60", DEADLINE_S="26")
    assert done.returncode == 124, done.stdout + done.stderr
    assert "gpu_check stopped at 6 s" in done.stdout
    assert (out / "report.json").is_file() and (out / "logs.tar.gz").is_file()


def test_no_kit_is_refused_before_anything_runs(tmp_path):
    done, out, calls = run(tmp_path, wheels=False)
    assert done.returncode == 3 and "no wheels in" in done.stderr and "make gpu-kit" in done.stderr
    assert calls == ""
