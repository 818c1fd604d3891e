"""The real lm-evaluation-harness CLI evaluates an export on a local task, offline."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toy_tasks import OFFLINE, tiny_export, toy_tasks

pytestmark = [pytest.mark.slow,  # real subprocesses (torchrun, the tools): make test-fast skips them
              pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                 reason="lm-evaluation-harness is not installed (not in the GPU image)")]


def test_lm_eval_cli_on_a_local_task(tmp_path, megatron_world):
    export, tasks = tiny_export(tmp_path), toy_tasks(tmp_path)
    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
         "--include_path", str(tasks), "--tasks", "mesh_toy", "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600, env=OFFLINE,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result_files = list((tmp_path / "results").rglob("results_*.json"))
    assert result_files, out.stdout[-2000:]
    results = json.loads(result_files[0].read_text())["results"]["mesh_toy"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert json.loads(result_files[0].read_text())["n-samples"]["mesh_toy"]["effective"] == 6
