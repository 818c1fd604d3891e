"""A tiny HF export with its tokenizer, and local lm-eval task files (no network)."""

import json
import os

import torch

from conftest import tiny_config

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

ROWS = [{"context": f"Question {i}: the answer is", "choices": [" yes", " no, certainly not"],
         "label": i % 2} for i in range(6)]


def tiny_export(tmp_path):
    """A random 1+2R2+1 MeSH model exported with a BPE tokenizer trained on pydoc text."""
    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.hf.export import build_hf_model, save_tokenizer
    from megatron_mesh.model.gpt import MeshGPTModel

    config = tiny_config("1+2R2+1", "mesh", vocab_size=512)
    torch.manual_seed(0)
    state = {k: v for k, v in MeshGPTModel(config).state_dict().items() if not k.endswith("_extra_state")}
    export = tmp_path / "export"
    build_hf_model(state, config).save_pretrained(export)
    save_tokenizer(train_bpe_tokenizer(pydoc_topics()[:30], 512, tmp_path / "tok"), export)
    return export


def toy_tasks(tmp_path, names=("mesh_toy",), rows=ROWS):
    """A directory of task YAMLs (for --include_path), all reading the same rows."""
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in names:
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=tmp_path / "data.jsonl"))
    return tasks
