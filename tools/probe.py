#!/usr/bin/env python
"""Representation probes of the MeSH paper (Sec. 4.1, Figures 3, 4, 5) for one or more models.

    python tools/probe.py --model CKPT_OR_HF_DIR [--model ...] [--name LABEL ...] --data DATA \
        [--tokenizer T] [--samples 500] [--seq-length L] [--cka-threshold 1.0] \
        [--batch-size 1] [--device cuda] --output DIR [--force]

Each model (a Megatron checkpoint or an HF export) runs over the same samples: the first L
tokens of each of the first N documents of DATA with at least L tokens (an indexed dataset
prefix, or a jsonl file tokenized with --tokenizer or the tokenizer the checkpoint names). L
defaults to 512 capped by the model's max_sequence_length. DIR receives

    update_magnitude.png   Fig. 3: relative update magnitude per block, mean +- std
    cka.png                Fig. 4: mean RBF CKA between h_emb, h(0) .. h(K), h_out
    spectrum.png           Fig. 5: top-50 normalised singular values per state, mean +- std
    probe.json             all numbers (also linear CKA) and, for MeSH, router statistics

with one 450 x 400 pixel panel per model (titled with --name, else after the run: 'demo' for
runs/demo/checkpoints, 'demo/hf' for runs/demo/hf). h_out is
the coda output before the final layer norm. DIR appears only when everything is written; a
non-empty DIR is replaced only with --force.
"""

import argparse
from pathlib import Path

from _bootstrap import cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="Megatron checkpoint or HF directory (repeat for several panels)")
    parser.add_argument("--name", action="append", default=None,
                        help="panel title per --model, in order (default: directory names)")
    parser.add_argument("--data", required=True, help="indexed dataset prefix or jsonl file")
    parser.add_argument("--tokenizer", default=None, help="for jsonl data (default: the model's)")
    parser.add_argument("--samples", type=int, default=500, help="documents to probe (default 500)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens per sample (default 512, capped by the model's maximum)")
    parser.add_argument("--cka-threshold", type=float, default=1.0,
                        help="RBF bandwidth as a fraction of the median distance (default 1.0)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per forward pass")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    cli.add_output(parser, "--out", required=True, help="output directory")
    cli.add_force(parser)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress lines (stderr: samples done, tokens/s, ETA)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the hash check of a Megatron checkpoint against its integrity manifest "
                             "(file sizes are still checked)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.name is not None and len(args.name) != len(args.model):
        cli.fail(f"--name given {len(args.name)} times for {len(args.model)} --model: "
                 f"expected one per model, in order")
    for flag, value, low in (("--samples", args.samples, 1), ("--seq-length", args.seq_length, 2),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            cli.fail(f"{flag} {value}: expected an integer >= {low}")
    if not args.cka_threshold > 0:
        cli.fail(f"--cka-threshold {args.cka_threshold}: expected a number > 0")
    for path in args.model:
        if not Path(path).is_dir():
            cli.fail(f"--model {path}: no such directory (expected a Megatron checkpoint or an HF model directory)")


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    import megatron_mesh  # the package first: megatron-core's CPU shims

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    from megatron_mesh.fs import check_writable

    import torch

    from megatron_mesh.probing import probe
    from megatron_mesh.progress import SILENT, ProgressLines

    check_writable(Path(args.output), args.force)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    probes = probe.probe_paths(args.model, args.data, args.samples, seq_length=args.seq_length,
                               tokenizer=args.tokenizer, names=args.name, threshold=args.cka_threshold,
                               batch_size=args.batch_size, device=device,
                               progress=SILENT if args.no_progress else ProgressLines(prefix="[probe]"),
                               verify_hashes=not args.no_verify)
    settings = {"data": str(args.data), "samples": args.samples,
                "cka_threshold": args.cka_threshold, "device": device}
    out = probe.write_report(probe.report(probes, settings), args.output, args.force)
    print(f"wrote {out}/: update_magnitude.png, cka.png, spectrum.png, probe.json")


if __name__ == "__main__":
    main()
