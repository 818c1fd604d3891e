#!/usr/bin/env python
"""Qualify a GPU machine for megatron-mesh in one command: a verdict line per check, a report.

    python tools/gpu_check.py [--output runs/gpu-check] [--checks versions,specs,...] [--budget-s 360]
    python tools/gpu_check.py --tiny      # the CPU stand-in (CI): every check's code, tiny models
    python tools/gpu_check.py --plan      # the expected time per check, from the FLOP counts

Checks, in order (megatron_mesh/qualify/): versions; specs (TransformerEngine spec == local spec,
logits and gradients, mesh and anchor); attention (the SDPA kernel: a fused one); cycle (the compiled
MeSH cycle == eager within bf16 rounding bounds, and faster); trainer (tools/pretrain_mesh.py,
bf16 + distributed optimizer, 160M base and mesh: loss falls, no NaN, save, resume, export);
throughput (410M and 1.4B 4+8R2+4 MeSH MFU, MeSH vs base step time and memory, vanilla 24,
from the trainer's [mesh] line); parity (TP=2 and PP=2 over NCCL, 2+ GPUs).

Exit status 0 when every check passed or was skipped, 1 when any failed, 2 on bad arguments.
OUT gets report.json, report.md (a block for docs/benchmarks.md), logs/ (each trainer run's
log, each failed check's traceback) and scratch/ (checkpoints, exports; removed unless --keep).
"""

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from _bootstrap import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_output(parser, "--out", default="runs/gpu-check", help="report directory (default %(default)s)")
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU stand-in: tiny models, gloo, no GPU needed (what CI runs)")
    parser.add_argument("--checks", default=None,
                        help="comma-separated subset, in the fixed order (default: all)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget; checks past it fail (default: 360 GPU, 900 tiny)")
    parser.add_argument("--keep", action="store_true", help="keep scratch/ (checkpoints, exports)")
    parser.add_argument("--plan", action="store_true", help="print the expected time and exit")
    return parser.parse_args(argv)


def selected(names, available):
    if names is None:
        return list(available)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in available]
    if unknown:
        cli.fail(f"--checks: unknown {unknown}; expected names from {list(available)}")
    return [n for n in available if n in wanted]


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # exports load from disk; never reach a hub
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers 5's, between verdicts
    if args.tiny:  # the CPU stand-in runs on the CPU on a GPU machine too (before torch sees CUDA)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import megatron_mesh  # (CPU shims before megatron.core)
    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    import torch

    from megatron_mesh.qualify import plan
    from megatron_mesh.qualify.profiles import GPU, TINY
    from megatron_mesh.qualify.runner import CHECKS, qualify

    profile = TINY if args.tiny else GPU
    if args.plan:
        print(plan.describe(profile))
        return 0
    names = selected(args.checks, CHECKS)
    if not args.tiny and not torch.cuda.is_available():
        cli.fail("no CUDA device is visible; --tiny runs the CPU stand-in")
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
    report = qualify(profile, Path(args.output), names, command, budget_s=args.budget_s)
    if not args.keep:
        shutil.rmtree(Path(args.output) / "scratch", ignore_errors=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
