#!/usr/bin/env python
"""Forward+backward step time of one or more configs, measured on this machine.

    python tools/benchmark.py --config configs/tiny-cpu.yml \
        --set model.state_scheme=base --compare model.state_scheme=mesh --iters 20

Each run is ``--config`` with its ``--set`` overrides; every ``--compare KEY=VALUE`` adds a run
with that override on top. Times are the median over ``--iters`` steps after ``--warmup``
steps, on whatever device torch uses (CPU here). "activations" is the memory autograd holds
for the backward pass after one forward (tensors saved for backward, each storage counted once,
parameters excluded): what activation recompute trades for time, e.g.

    python tools/benchmark.py --config configs/bench-cpu.yml --set model.state_scheme=mesh \
        --compare parallelism.recompute_granularity=full ...

(recompute keys: model.recompute_granularity=full, model.recompute_method=uniform,
model.recompute_num_layers=1). The fuller GPU benchmark (tokens/s, MFU, memory) is tracked
separately.
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


def saved_activation_bytes(model, tokens, positions) -> int:
    """Bytes autograd keeps for backward after one forward (distinct storages, no parameters)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens, positions, labels=tokens).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def time_steps(cfg, batch, seq, iters, warmup):
    import torch

    from megatron_mesh.model import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    activations = saved_activation_bytes(model, tokens, positions)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        model(tokens, positions, labels=tokens).mean().backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), activations


def model_with_recompute(config, overrides):
    """The config's model, with its parallelism.recompute_* settings (the trainer's mapping)."""
    from megatron_mesh.yaml_config import load_config_tree, model_config

    tree, origins = load_config_tree(config, overrides)
    parallelism = tree.get("parallelism") or {}
    recompute = {k: parallelism[k] for k in ("recompute_granularity", "recompute_method",
                                             "recompute_num_layers") if k in parallelism}
    return model_config(tree, origins, **recompute)


def main(argv=None):
    import torch

    from megatron_mesh.parallel.process_groups import initialize_single_process

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    initialize_single_process()
    runs = [("(base config)", args.overrides)] + [(c, args.overrides + c.split()) for c in args.compare]
    results = []
    for name, overrides in runs:
        cfg = model_with_recompute(args.config, overrides)
        median, best, activations = time_steps(cfg, args.batch, args.seq_length, args.iters,
                                               args.warmup)
        results.append(dict(run=name, layout=str(cfg.parsed_layout), scheme=cfg.state_scheme,
                            median_s=median, min_s=best, activation_bytes=activations))
    if args.json:
        print(json.dumps(dict(device=str(torch.device("cpu")), threads=args.threads,
                              batch=args.batch, seq_length=args.seq_length, runs=results)))
        return
    print(f"batch {args.batch} x seq {args.seq_length}, {args.threads} threads, "
          f"median of {args.iters} forward+backward steps")
    ref = results[0]["median_s"]
    for r in results:
        print(f"{r['run']:<28} {r['layout']:>10} {r['scheme']:<12} "
              f"{r['median_s'] * 1e3:8.1f} ms  (min {r['min_s'] * 1e3:.1f})  x{r['median_s'] / ref:.3f}"
              f"  activations {r['activation_bytes'] / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
