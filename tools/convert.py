#!/usr/bin/env python
"""Convert megatron-mesh checkpoints to Hugging Face.

    python tools/convert.py megatron-to-hf --load CHECKPOINT_DIR --output HF_DIR \
        [--iteration N] [--dtype fp32|bf16] [--tokenizer PATH_OR_NAME] [--force]

Reads a torch_dist checkpoint saved at any TP layout on one CPU process (no GPU, no
torch.distributed job). Vanilla layouts become plain GPTNeoXForCausalLM; recursive ones load
with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True). The output directory
appears only when complete. (HF -> Megatron is not implemented yet.)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_mesh  # noqa: E402,F401


def main(argv=None):
    from megatron_mesh.hf.export import CheckpointError, export

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    m2h = sub.add_parser("megatron-to-hf")
    m2h.add_argument("--load", required=True)
    m2h.add_argument("--output", required=True)
    m2h.add_argument("--iteration", type=int, default=None)
    m2h.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    m2h.add_argument("--tokenizer", default=None, help="default: the tokenizer the run trained with")
    m2h.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        out = export(args.load, args.output, args.dtype, args.tokenizer, args.iteration, args.force)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
