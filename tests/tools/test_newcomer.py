"""The path a new user takes, end to end with the project's own tools: their own text ->
preprocess_data.py -> a YAML copied out of the repository -> torchrun --cpu -> Ctrl-C -> the
same command again (resume) -> convert.py -> the standard Hugging Face
``generate(**tok(...))`` -> evaluate.py depth. As the README's CPU quickstart does it."""

import json
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, SHARED
from megatron_mesh.training import exit_status

pytestmark = pytest.mark.slow  # real torchrun and tool processes

TOKENIZER = SHARED / "data" / "20B_tokenizer.json"  # a tokenizer.json file, as docs/configuration.md allows
CONFIG = """\
# my first run: the tiny CPU model on my own text
extends: tiny-cpu.yml
model:
  vocab_size: 50304
data:
  mock: false
  path: [{data}]
  split: "90,10,0"
tokenizer:
  type: HuggingFaceTokenizer
  model: {tokenizer}
  vocab_size: null
training:
  train_iters: 16
checkpointing:
  save: {save}
  interval: 4
logging:
  interval: 4
"""


def _own_text(path):
    from megatron_mesh.corpora.python_docs import python_docs_corpus

    with open(path, "w") as f:
        for doc in python_docs_corpus()[:400]:
            f.write(json.dumps({"text": doc}) + "\n")


def _tool(*args, timeout=600):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                         timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def _trainer(config, tmp_path):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
            str(REPO / "tools" / "pretrain_mesh.py"), "--config", str(config), "--cpu"]


def _ctrl_c_after_the_first_save(cmd):
    """The run, Ctrl-C'd (SIGINT to torchrun) once it has saved; its console."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"successfully saved checkpoint from iteration\s+4", line):
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    proc.wait(timeout=180)
    return "".join(lines)


def test_own_text_to_a_trained_resumed_exported_and_studied_model(tmp_path):
    _own_text(tmp_path / "mine.jsonl")
    data = tmp_path / "data" / "mine_text_document"
    _tool("tools/preprocess_data.py", "--input", tmp_path / "mine.jsonl", "--tokenizer", TOKENIZER,
          "--output-prefix", data, "--no-progress")
    save = tmp_path / "run"
    config = tmp_path / "mine.yml"  # outside the repository: `extends` finds configs/tiny-cpu.yml
    config.write_text(CONFIG.format(data=data, tokenizer=TOKENIZER, save=save))

    stopped = _ctrl_c_after_the_first_save(_trainer(config, tmp_path))
    status = exit_status.read(save / "exit_status.json")
    assert (status.stop, status.requeue) == ("signal", True), stopped[-3000:]

    resumed = subprocess.run(_trainer(config, tmp_path), capture_output=True, text=True, cwd=REPO, timeout=600)
    console = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, console[-4000:]
    assert f"successfully loaded checkpoint from {save}" in console or "loading" in console.lower()
    assert exit_status.read(save / "exit_status.json").stop == "finished"
    lines = console.splitlines()
    print(f"console of the resumed run: {len(lines)} lines")  # (the note quotes it)
    assert len(lines) < 40, console  # compact: no argument dump, bucket lists or memory reports
    assert "seed ...." in (save / "logs" / "rank-0.log").read_text()  # ...which the log file keeps

    hf = tmp_path / "hf"
    _tool("tools/convert.py", "megatron-to-hf", "--input", save, "--output", hf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    ids = model.generate(**tok("The for statement", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] == len(tok("The for statement")["input_ids"]) + 5

    study = _tool("tools/evaluate.py", "depth", "--model", hf, "--data", data,
                  "--max-documents", 8, "--seq-length", 64, "--output", tmp_path / "depth")
    assert "2 (K)" in study.stdout and (tmp_path / "depth" / "depth.png").exists(), study.stdout
    assert "done, 8 documents" in study.stderr  # its progress
