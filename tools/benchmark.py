#!/usr/bin/env python
"""Forward+backward step time of one or more configs, measured on this machine.

    python tools/benchmark.py --config configs/tiny-cpu.yml \
        --set model.state_scheme=base --compare model.state_scheme=mesh --iters 20

Each run is ``--config`` with its ``--set`` overrides; every ``--compare KEY=VALUE`` adds a run
with that override on top. Times are the median over ``--iters`` steps after ``--warmup``
steps, on whatever device torch uses (CPU here). The fuller GPU benchmark (tokens/s, MFU,
memory) is tracked separately.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_mesh  # noqa: E402,F401  (CPU shims before megatron.core)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="add a run with this extra override (repeatable)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def time_steps(cfg, batch, seq, iters, warmup):
    import torch

    from megatron_mesh.model import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        model(tokens, positions, labels=tokens).mean().backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main(argv=None):
    import torch

    from megatron_mesh.parallel.process_groups import initialize_single_process
    from megatron_mesh.yaml_config import load_model_config

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    initialize_single_process()
    runs = [("(base config)", args.overrides)] + [(c, args.overrides + [c]) for c in args.compare]
    results = []
    for name, overrides in runs:
        cfg = load_model_config(args.config, overrides)
        median, best = time_steps(cfg, args.batch, args.seq_length, args.iters, args.warmup)
        results.append(dict(run=name, layout=str(cfg.parsed_layout), scheme=cfg.state_scheme,
                            median_s=median, min_s=best))
    if args.json:
        print(json.dumps(dict(device=str(torch.device("cpu")), threads=args.threads,
                              batch=args.batch, seq_length=args.seq_length, runs=results)))
        return
    print(f"batch {args.batch} x seq {args.seq_length}, {args.threads} threads, "
          f"median of {args.iters} forward+backward steps")
    ref = results[0]["median_s"]
    for r in results:
        print(f"{r['run']:<28} {r['layout']:>10} {r['scheme']:<12} "
              f"{r['median_s'] * 1e3:8.1f} ms  (min {r['min_s'] * 1e3:.1f})  x{r['median_s'] / ref:.3f}")


if __name__ == "__main__":
    main()
