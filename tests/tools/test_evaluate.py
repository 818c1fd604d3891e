"""tools/evaluate.py ppl and depth as a user runs them: reports on disk, errors that say what is
wrong. (lm-eval: tests/evaluation/test_downstream.py.)"""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from toy_tasks import OFFLINE

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

SECTION = dict(layout="1+2R2+1", state_scheme="mesh", hidden_size=64, num_attention_heads=4,
               vocab_size=512, max_sequence_length=64)


def evaluate(*args):
    return subprocess.run([sys.executable, "tools/evaluate.py", *map(str, args)], cwd=REPO,
                          env=OFFLINE, capture_output=True, text=True, timeout=300)


def table_rows(stdout, first_header):
    """The printed table's cells, from its header line on."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" ")[0] == first_header)
    return [[cell.strip() for cell in line.split("|")] for line in lines[start:] if "|" in line]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random 1+2R2+1 MeSH checkpoint with a BPE tokenizer, its HF export, and data."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer, write_indexed_dataset
    from megatron_mesh.data.tokenizer import load_tokenizer
    from megatron_mesh.hf.export import export

    tmp = tmp_path_factory.mktemp("evaluate")
    texts = [t[:500] for t in pydoc_topics()[:36]]
    tok = train_bpe_tokenizer(texts[:30], 512, tmp / "tok")
    config = MeshConfig.from_section(SECTION)
    ckpt = save_release_checkpoint(build_model(config, {}, ("",), 0), checkpoint_args(config, tok),
                                   tmp / "ckpt")
    hf = export(str(ckpt), str(tmp / "hf"))
    gated = MeshConfig.from_section({**SECTION, "layout": "1+1R3+1", "exit_gate": True})
    gated_ckpt = save_release_checkpoint(build_model(gated, {}, ("",), 0),
                                         checkpoint_args(gated, tok), tmp / "gated" / "ckpt")
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[30:33]))
    encoder = load_tokenizer(tok)
    write_indexed_dataset([encoder.encode(t) for t in texts[33:]], str(tmp / "docs"), 512)
    return {"tmp": tmp, "ckpt": ckpt, "hf": hf, "gated": gated_ckpt, "jsonl": tmp / "docs.jsonl",
            "indexed": tmp / "docs"}


def test_ppl_report(files):
    out = files["tmp"] / "report" / "ppl.json"
    run = evaluate("ppl", "--model", files["ckpt"], "--model", files["hf"], "--name", "mesh",
                   "--name", "mesh-hf", "--data", files["indexed"], "--data", files["jsonl"],
                   "--seq-length", 32, "--batch-size", 4, "--output", out)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "non-overlapping windows" in report["context"]
    records = report["results"]
    assert [(r["name"], r["backend"], r["data"]) for r in records] == [
        ("mesh", "megatron", str(files["indexed"])), ("mesh", "megatron", str(files["jsonl"])),
        ("mesh-hf", "hf", str(files["indexed"])), ("mesh-hf", "hf", str(files["jsonl"]))]
    # progress on stderr, one closing line per model and dataset; stdout has the table only
    assert f"[ppl] loading {files['hf']}" in run.stderr
    assert "[ppl] mesh-hf on docs.jsonl: done, 3 documents" in run.stderr and "[ppl]" not in run.stdout
    for r in records:
        assert r["seq_length"] == 32 and r["tokens"] > 3 * 32
        assert r["perplexity"] == pytest.approx(math.exp(r["mean_nll"]))
        assert r["bits_per_token"] == pytest.approx(r["mean_nll"] / math.log(2))
    for megatron, hf in zip(records[:2], records[2:]):
        assert hf["tokens"] == megatron["tokens"]
        assert hf["perplexity"] == pytest.approx(megatron["perplexity"], rel=1e-4)
    header, _, *rows = table_rows(run.stdout, "model")
    assert header == ["model", "docs", "docs.jsonl"]
    assert rows == [[r["name"], f"{r['perplexity']:.3f}", f"{s['perplexity']:.3f}"]
                    for r, s in (records[:2], records[2:])]
    assert not list(out.parent.glob("*.tmp"))


def test_depth_report_and_figure(files):
    from PIL import Image

    out = files["tmp"] / "depth"
    run = evaluate("depth", "--model", files["ckpt"], "--data", files["indexed"], "--seq-length", 32,
                   "--output-dir", out)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "depth.json").read_text())
    assert {"model", "layout", "state_scheme", "trained_loops", "max_loops", "tokens", "rows"} <= set(report)
    assert [r["t"] for r in report["rows"]] == [0, 1, 2]
    assert set(report["rows"][0]) == {"t", "read_out_loss", "read_out_ppl", "coda_lens_loss",
                                      "coda_lens_ppl", "direct_lens_loss", "direct_lens_ppl"}
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "depth.png") as image:
        assert image.size == (1000, 450)
    # named after the run holding checkpoint directory 'ckpt', not 'ckpt'; progress on stderr
    assert report["model"] == files["tmp"].name
    assert f"[depth] {files['tmp'].name} on docs, t = 0..2: done, 3 documents" in run.stderr
    quiet = evaluate("depth", "--model", files["ckpt"], "--data", files["indexed"], "--seq-length", 32,
                     "--no-progress")
    assert quiet.returncode == 0 and "[depth]" not in quiet.stderr and quiet.stdout == run.stdout.split("wrote")[0]
    header, _, *rows = table_rows(run.stdout, "t")
    assert header == ["t", "loss", "ppl", "coda-lens ppl", "direct-lens ppl"]
    assert [row[0] for row in rows] == ["0", "1", "2 (K)"]
    assert rows[1][1:3] == [f"{report['rows'][1]['read_out_loss']:.4f}",
                            f"{report['rows'][1]['read_out_ppl']:.3f}"]


def test_exit_frontier_report_and_figure(files):
    """Fixed depths, KL exit and the learned gate of a gated checkpoint (run as the HF twin,
    converted in memory): the fixed-K row is what megatron's own model scores (ppl)."""
    out = files["tmp"] / "exit"
    run = evaluate("exit", "--model", files["gated"], "--data", files["indexed"], "--seq-length", 32,
                   "--kl", "1e-3,10", "--gate", "0.5", "--generate-tokens", 3, "--prompts", 2,
                   "--output-dir", out)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "exit.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["fixed 1", "fixed 2", "fixed 3", "kl 0.001", "kl 10", "gate 0.5"]
    assert rows["kl 10"]["mean_steps"] == 2  # KL needs two steps; a huge threshold exits at once
    assert 1 <= rows["gate 0.5"]["mean_steps"] <= 3
    ppl = evaluate("ppl", "--model", files["gated"], "--data", files["indexed"], "--seq-length", 32,
                   "--output", out / "ppl.json")
    assert ppl.returncode == 0, ppl.stderr[-3000:]
    megatron = json.loads((out / "ppl.json").read_text())["results"][0]
    assert report["tokens"] == megatron["tokens"]
    assert rows["fixed 3"]["mean_nll"] == pytest.approx(megatron["mean_nll"], rel=1e-5)
    assert [g["label"] for g in report["generation"]] == list(rows)
    assert all(g["tokens"] == 6 for g in report["generation"])
    assert (out / "exit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, _, *table = table_rows(run.stdout, "policy")
    assert header == ["policy", "mean NLL", "ppl", "steps/token", "layers/token", "output layers/token",
                      "% of tokens at 1..T steps"]
    assert table[2][6] == "0/0/100"  # fixed 3
    assert [row[0] for row in table[:6]] == list(rows)
    verdicts = ("fewer steps", "more steps", "lower than every fixed depth")
    assert sum(line.endswith(verdicts) for line in run.stdout.splitlines()) == 3  # kl x 2, gate
    plain = evaluate("exit", "--model", files["ckpt"], "--data", files["indexed"], "--gate", "0.5")
    assert plain.returncode == 2 and "exit_gate" in plain.stderr, plain.stderr[-2000:]
    for flags, message in [(("--max-steps", 4), "fixed 4: num_loops=4: expected 0..3"),
                           (("--gate", "1.5"), "gate 1.5: ExitPolicy.threshold=1.5: expected 0..1"),
                           (("--kl", "nan"), "--kl nan: expected comma-separated numbers")]:
        bad = evaluate("exit", "--model", files["gated"], "--data", files["indexed"], *flags)
        assert bad.returncode == 2 and f"error: {message}" in bad.stderr, bad.stderr[-2000:]


def test_bad_input(files):
    missing = evaluate("ppl", "--model", files["ckpt"], "--data", files["tmp"] / "nothing")
    assert missing.returncode != 0
    assert f"error: --data {files['tmp'] / 'nothing'}: neither an indexed dataset prefix" in missing.stderr
    no_model = evaluate("depth", "--model", files["tmp"] / "nomodel", "--data", files["jsonl"])
    assert no_model.returncode != 0 and "nomodel: no such model directory" in no_model.stderr
    mesh = evaluate("depth", "--model", files["ckpt"], "--data", files["indexed"], "--max-loops", 3)
    assert mesh.returncode != 0
    assert (f"error: {files['tmp'].name}: --max-loops 3 is not possible for layout '1+2R2+1' with "
            f"state_scheme 'mesh'" in mesh.stderr)
