#!/usr/bin/env python
"""Evaluate megatron-mesh models the way the paper does.

    python tools/evaluate.py lm-eval --model HF_DIR [--tasks t1,t2,...] [--num-fewshot 0,5] \
        [--batch-size 8] [--device cuda] [--limit N] [--include-path TASK_DIR] [--output FILE.json]

lm-eval runs lm-evaluation-harness on an HF export (tools/convert.py megatron-to-hf) on the
paper's nine tasks by default (LAMBADA OpenAI/standard, HellaSwag, PIQA, WinoGrande, ARC-E,
ARC-C, SciQ, continuation-MMLU), prints a table shaped like the paper's Table 2 (accuracy in
percent; byte-length-normalised accuracy for PIQA, HellaSwag, ARC and SciQ) and saves JSON with
lm-eval's full results. Datasets come from the Hugging Face cache (HF_DATASETS_OFFLINE=1 on
machines without network); --include-path adds local task YAMLs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lm = sub.add_parser("lm-eval", help="downstream tasks with lm-evaluation-harness (Table 2)")
    lm.add_argument("--model", required=True, help="HF model directory")
    lm.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (default: the paper's nine)")
    lm.add_argument("--num-fewshot", default="0,5", help="comma-separated shot counts (default 0,5)")
    lm.add_argument("--batch-size", type=int, default=8)
    lm.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    lm.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    lm.add_argument("--limit", type=float, default=None, help="examples per task (smoke runs only)")
    lm.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    lm.add_argument("--name", default=None, help="row label (default: the model directory name)")
    lm.add_argument("--output", default=None, help="JSON report (default: MODEL/lm_eval.json)")
    return parser.parse_args(argv)


def main(argv=None):
    from megatron_mesh.evaluation import downstream

    args = parse_args(argv)
    try:
        model = downstream.check_model_dir(args.model)
        shots = downstream.parse_shots(args.num_fewshot)
    except ValueError as err:
        sys.exit(f"error: {err}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    report = downstream.evaluate(model, tasks, shots, args.batch_size, device, args.limit,
                                 args.include_path, args.dtype)
    output = Path(args.output) if args.output else model / "lm_eval.json"
    downstream.save(report, output)
    print(downstream.table(report, args.name))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
