#!/usr/bin/env python
"""The smallest real run: a tiny MeSH model (configs/tiny-cpu.yml) trained for a few steps on CPU.

The data is synthetic and learnable: each sequence counts upwards (modulo --task-vocab) from a
random start, so after the first token every next token is determined and the loss should fall
from ln(vocab) ~ 10.8 towards zero. The full
Pythia-style trainer (tools/pretrain_mesh.py) replaces this once it exists.

    python tools/demo.py [--config configs/tiny-cpu.yml] [--steps 40]
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import megatron_mesh  # noqa: E402,F401  (CPU shims before megatron.core)


def counting_batch(generator, batch, seq, vocab):
    import torch

    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    tokens = (start + torch.arange(seq + 1)) % vocab + 2  # [b, s+1]; ids 0/1 are EOD/pad
    return tokens[:, :-1], tokens[:, 1:]


def main(argv=None):
    import torch

    from megatron_mesh.model import MeshGPTModel
    from megatron_mesh.parallel.process_groups import initialize_single_process
    from megatron_mesh.yaml_config import load_model_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--task-vocab", type=int, default=1000, help="token ids used by the task")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    initialize_single_process(seed=1234)
    cfg = load_model_config(args.config)
    model = MeshGPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(args.seq_length).unsqueeze(0).expand(args.batch, -1)
    print(f"model {cfg.parsed_layout} ({cfg.state_scheme}, B={cfg.buffer_slots}), hidden {cfg.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    start = time.time()
    for step in range(1, args.steps + 1):
        inputs, labels = counting_batch(gen, args.batch, args.seq_length, args.task_vocab)
        loss = model(inputs, positions, labels=labels)  # [b, s]
        optimizer.zero_grad()
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step == 1 or step % 5 == 0:
            print(f"step {step:4d}  loss {loss.mean().item():.4f}  "
                  f"{(time.time() - start) / step:.3f} s/step")


if __name__ == "__main__":
    main()
