"""The real lm-evaluation-harness CLI evaluates an export on a local task, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config

TASK = """task: mesh_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_cli_on_a_local_task(tmp_path, megatron_world):
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.data.local_corpus import pydoc_topics
    from megatron_mesh.hf.export import _save_tokenizer, build_hf_model
    from megatron_mesh.model import MeshGPTModel

    config = tiny_config("1+2R2+1", "mesh", vocab_size=512)
    torch.manual_seed(0)
    state = {k: v for k, v in MeshGPTModel(config).state_dict().items() if not k.endswith("_extra_state")}
    export = tmp_path / "export"
    build_hf_model(state, config).save_pretrained(export)
    _save_tokenizer(train_bpe_tokenizer(pydoc_topics()[:30], 512, tmp_path / "tok"), export)

    rows = [{"context": f"Question {i}: the answer is", "choices": [" yes", " no"], "label": i % 2}
            for i in range(6)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mesh_toy.yaml").write_text(TASK.format(data=tmp_path / "data.jsonl"))
    lm_eval = Path(sys.executable).with_name("lm_eval")
    out = subprocess.run(
        [str(lm_eval), "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
         "--include_path", str(tasks), "--tasks", "mesh_toy", "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result_files = list((tmp_path / "results").rglob("results_*.json"))
    assert result_files, out.stdout[-2000:]
    results = json.loads(result_files[0].read_text())["results"]["mesh_toy"]
    assert 0.0 <= results["acc,none"] <= 1.0
    assert json.loads(result_files[0].read_text())["n-samples"]["mesh_toy"]["effective"] == 6
