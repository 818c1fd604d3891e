#!/usr/bin/env python
"""`make demo`: train a small MeSH model on CPU from nothing but what ships with Python.

1. builds an English corpus from Python's own documentation (pydoc topics + stdlib docstrings),
2. trains a 4096-entry byte-level BPE tokenizer on it (saved as a Hugging Face directory),
3. writes a Megatron indexed dataset (.bin/.idx),
4. trains configs/demo-cpu.yml with tools/pretrain_mesh.py under torchrun (Megatron's trainer),
   saving torch_dist checkpoints and TensorBoard events,
5. exports the checkpoint to Hugging Face (tools/convert.py) and samples from it,
6. prints where everything is.

    python tools/demo.py [--output runs/demo] [--iters 300]
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from _bootstrap import ROOT as REPO, cli

SHOW = re.compile(r"^ \[mesh\]|saving checkpoint|successfully saved|Error|error:")
LOSS = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?learning rate: ([0-9.eE+-]+).*?lm loss: ([0-9.eE+-]+)"
                  r".*?grad norm: ([0-9.]+)")


def build_data(out: Path, vocab_size: int):
    from megatron_mesh.corpora.python_docs import python_docs_corpus
    from megatron_mesh.data.indexed import train_bpe_tokenizer, write_indexed_dataset
    from transformers import AutoTokenizer

    docs = python_docs_corpus()
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters of Python documentation")
    tok_dir = train_bpe_tokenizer(docs, vocab_size, out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eod = tok.eos_token_id
    prefix = out / "data" / "python_docs_text_document"
    tokens = write_indexed_dataset((tok.encode(d) + [eod] for d in docs), prefix, len(tok))
    print(f"tokenizer: {tok_dir} ({len(tok)} ids)   dataset: {prefix}.bin/.idx ({tokens:,} tokens)")
    return tok_dir, prefix


def train(out: Path, tok_dir: str, prefix: Path, iters: int, extra):
    sets = {
        "data.path": f"[{prefix}]",
        "tokenizer.model": tok_dir,
        "training.train_iters": iters,
        "checkpointing.save": out / "checkpoints",
        "logging.tensorboard_dir": out / "tensorboard",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(REPO / "tools" / "pretrain_mesh.py"), "--config", str(REPO / "configs" / "demo-cpu.yml"), "--cpu",
           *[f"--set={k}={v}" for k, v in sets.items()], *extra]
    log_path = out / "train.log"
    losses = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        for line in proc.stdout:
            log.write(line)
            match = LOSS.search(line)
            if match:
                it, total, lr, loss, grad = match.groups()
                losses[int(it)] = float(loss)
                print(f" iteration {int(it):5d}/{total} | lm loss {float(loss):.4f} | lr {float(lr):.2e} | "
                      f"grad norm {grad}", flush=True)
            elif SHOW.search(line):
                print(line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        sys.exit(f"training failed (exit {code}); full log: {log_path}")
    return losses, log_path


def sample(out: Path, prompt: str = "The for statement") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mesh.hf.export import export

    hf_dir = export(str(out / "checkpoints"), str(out / "hf"), force=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out_ids = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=20, temperature=0.8,
                                 pad_token_id=tok.pad_token_id)
    print(f"\nsample from the HF export (top-k 20, T 0.8):\n{tok.decode(out_ids[0])!r}\n")
    return hf_dir


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_output(parser, "--out", default=str(REPO / "runs" / "demo"),
                   help="where the data, checkpoints, logs and export go (default %(default)s)")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args, extra = parser.parse_known_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    out = Path(args.output)
    start = time.time()
    tok_dir, prefix = build_data(out, args.vocab_size)
    losses, log_path = train(out, tok_dir, prefix, args.iters, extra)
    first, last = losses[min(losses)], losses[max(losses)]
    print(f"\nloss {first:.3f} (iteration {min(losses)}) -> {last:.3f} (iteration {max(losses)}) "
          f"in {time.time() - start:.0f} s")
    hf_dir = sample(out)
    print(f"checkpoints: {out / 'checkpoints'}\ntensorboard: {out / 'tensorboard'}\nlog:         {log_path}")
    print(f"hf export:   {hf_dir}  (AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True))")


if __name__ == "__main__":
    main()
