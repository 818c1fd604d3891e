"""The paper's downstream evaluation (App. B, Table 2) through lm-evaluation-harness.

Nine tasks, 0- and 5-shot; accuracy normalised by the byte length of the target (lm-eval's
``acc_norm``) for PIQA, HellaSwag, ARC-E, ARC-C and SciQ, plain accuracy for LAMBADA (OpenAI and
standard), WinoGrande and continuation-MMLU; the average is over the nine columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_mesh.errors import CheckpointError, ConfigError
from megatron_mesh.evaluation.tables import text_table


@dataclass(frozen=True)
class Column:
    """One column of the results table."""

    label: str
    task: str
    """lm-eval task (or group) name."""
    metric: str
    """lm-eval metric the paper reports for it."""


PAPER_TASKS = (
    Column("LD-O", "lambada_openai", "acc"),
    Column("LD-S", "lambada_standard", "acc"),
    Column("HS", "hellaswag", "acc_norm"),
    Column("PQ", "piqa", "acc_norm"),
    Column("WG", "winogrande", "acc"),
    Column("ARC-E", "arc_easy", "acc_norm"),
    Column("ARC-C", "arc_challenge", "acc_norm"),
    Column("SciQ", "sciq", "acc_norm"),
    Column("cMMLU", "mmlu_continuation", "acc"),
)
_BY_TASK = {c.task: c for c in PAPER_TASKS}


def columns_for(tasks: Optional[Sequence[str]]) -> List[Column]:
    """The paper's columns, or one per named task (the paper's metric where it has one, else
    ``acc_norm`` when the task reports it, else ``acc``; chosen from the results)."""
    if not tasks:
        return list(PAPER_TASKS)
    return [_BY_TASK.get(t, Column(t, t, "")) for t in tasks]


def metric_value(results: dict, column: Column) -> float:
    """The column's value (a fraction) in lm-eval's ``results`` dict."""
    entry = results.get(column.task)
    if entry is None:
        raise KeyError(f"lm-eval returned no results for task {column.task!r}")
    metric = column.metric or ("acc_norm" if "acc_norm,none" in entry else "acc")
    key = f"{metric},none"
    if key not in entry:
        raise KeyError(f"task {column.task!r} reported {sorted(entry)}, not {key!r}")
    return float(entry[key])


def evaluate(model_dir, *, tasks: Optional[Sequence[str]] = None, shots: Sequence[int] = (0, 5),
             batch_size: int = 8, device: str = "cpu", limit: Optional[float] = None,
             include_path: Optional[str] = None, dtype: str = "float32",
             trust_remote_code: bool = False) -> dict:
    """Run lm-eval once per few-shot setting on one loaded model; return a JSON-able report.
    ``trust_remote_code``: run the Python files of a foreign model directory (never those of a
    megatron-mesh export: megatron_mesh.hf.auto)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    columns = columns_for(tasks)
    lm = harness_model(model_dir, batch_size, device, dtype, trust_remote_code)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    report = {"model": str(model_dir), "lm_eval_version": lm_eval.__version__, "limit": limit,
              "columns": [c.__dict__ for c in columns], "shots": {}}
    for n in shots:
        out = lm_eval.simple_evaluate(model=lm, tasks=[c.task for c in columns], num_fewshot=n,
                                      limit=limit, task_manager=manager, log_samples=False)
        values = {c.label: metric_value(out["results"], c) for c in columns}
        report["shots"][str(n)] = {"values": values, "average": sum(values.values()) / len(values),
                                   "lm_eval_results": out["results"]}
    return report


def harness_model(model_dir, batch_size: int, device: str, dtype: str, trust_remote_code: bool):
    """lm-eval's HFLM over ``model_dir``. A megatron-mesh export is handed over loaded by the
    project's own class (HFLM given a path would import the folder's modeling file)."""
    from lm_eval.models.huggingface import HFLM

    from megatron_mesh.hf.auto import is_megatron_mesh_export, load_causal_lm

    if not is_megatron_mesh_export(model_dir):
        return HFLM(pretrained=str(model_dir), trust_remote_code=trust_remote_code,
                    batch_size=batch_size, device=device, dtype=dtype)
    import torch

    model = load_causal_lm(model_dir).to(device=device, dtype=getattr(torch, dtype)).eval()
    return HFLM(pretrained=model, tokenizer=str(model_dir), batch_size=batch_size)


def table(report: dict, name: Optional[str] = None) -> str:
    """Rows per few-shot setting, a column per task and the average, in percent (Table 2)."""
    from megatron_mesh.evaluation.names import model_name

    labels = [c["label"] for c in report["columns"]]
    name = name or model_name(report["model"])  # the run, not 'hf'
    header = ["Model", "Variant", *labels, "Avg."]
    rows = [[name, f"{n}-shot", *(f"{100 * r['values'][k]:.2f}" for k in labels),
             f"{100 * r['average']:.2f}"] for n, r in report["shots"].items()]
    return text_table(header, rows)


def save(report: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def parse_shots(text: str) -> List[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--num-fewshot={text!r}: expected comma-separated integers, e.g. 0,5") from None
    if not shots or any(s < 0 for s in shots):
        raise ConfigError(f"--num-fewshot={text!r}: expected comma-separated integers >= 0, e.g. 0,5")
    return shots


def check_model_dir(path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json); convert a "
                              f"Megatron checkpoint first: tools/convert.py megatron-to-hf")
    return path

