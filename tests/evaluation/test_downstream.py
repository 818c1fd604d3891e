"""tools/evaluate.py lm-eval: lm-evaluation-harness on an export, checked against a direct
computation of the same accuracies with the HF model."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from toy_tasks import OFFLINE, ROWS, tiny_export, toy_tasks


def direct_accuracies(export):
    """acc and acc_norm (log-likelihood / target bytes) as lm-eval defines them, computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    acc = acc_norm = 0
    for row in ROWS:
        scores = []
        for choice in row["choices"]:
            context = tok.encode(row["context"])
            whole = tok.encode(row["context"] + choice)
            target = whole[len(context):]
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits.log_softmax(-1)[0]
            positions = range(len(whole) - 1 - len(target), len(whole) - 1)
            scores.append(sum(logp[p, t].item() for p, t in zip(positions, target)))
        acc += max(range(2), key=lambda i: scores[i]) == row["label"]
        normed = [s / len(c.encode()) for s, c in zip(scores, row["choices"])]
        acc_norm += max(range(2), key=lambda i: normed[i]) == row["label"]
    return acc / len(ROWS), acc_norm / len(ROWS)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-evaluation-harness is not installed (not in the GPU image)")
def test_lm_eval_table_matches_a_direct_computation(tmp_path, megatron_world):
    export, tasks = tiny_export(tmp_path), toy_tasks(tmp_path, names=("toy_a", "toy_b"))
    out = subprocess.run(
        [sys.executable, str(REPO / "tools/evaluate.py"), "lm-eval", "--model", str(export),
         "--tasks", "toy_a,toy_b", "--num-fewshot", "0,1", "--include-path", str(tasks),
         "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path / "report.json")],
        capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    acc, acc_norm = direct_accuracies(export)
    zero = report["shots"]["0"]
    # a task outside the paper's list reports acc_norm when it has it
    assert zero["values"] == {"toy_a": pytest.approx(acc_norm), "toy_b": pytest.approx(acc_norm)}
    assert zero["lm_eval_results"]["toy_a"]["acc,none"] == pytest.approx(acc)
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if "-shot" in line}
    assert sorted(rows) == ["0-shot", "1-shot"]
    cells = [c.strip() for c in rows["1-shot"].split("|")]
    one = report["shots"]["1"]
    assert cells[2:] == [f"{100 * one['values']['toy_a']:.2f}", f"{100 * one['values']['toy_b']:.2f}",
                         f"{100 * one['average']:.2f}"]


def test_paper_columns_and_metrics():
    from megatron_mesh.evaluation.downstream import PAPER_TASKS, columns_for, metric_value

    assert [c.label for c in PAPER_TASKS] == ["LD-O", "LD-S", "HS", "PQ", "WG", "ARC-E", "ARC-C",
                                               "SciQ", "cMMLU"]
    normed = {c.label for c in PAPER_TASKS if c.metric == "acc_norm"}
    assert normed == {"PQ", "HS", "ARC-E", "ARC-C", "SciQ"}  # App. B: byte-length normalised
    piqa = columns_for(["piqa"])[0]
    assert metric_value({"piqa": {"acc,none": 0.6, "acc_norm,none": 0.7}}, piqa) == 0.7
    with pytest.raises(KeyError, match="no results for task 'piqa'"):
        metric_value({}, piqa)


def test_errors(tmp_path):
    from megatron_mesh.evaluation.downstream import check_model_dir, parse_shots

    assert parse_shots("0,5") == [0, 5]
    with pytest.raises(ValueError, match="--num-fewshot='0,x'"):
        parse_shots("0,x")
    with pytest.raises(ValueError, match="no config.json.*megatron-to-hf"):
        check_model_dir(tmp_path)
