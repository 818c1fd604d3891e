#!/usr/bin/env python
"""Show what the trainer reads at a given step: token ids (and text) of Pythia's pre-shuffled data.

    python tools/batch_viewer.py --data data/pile-deduped-pythia-preshuffled/document \
        --seq-length 4096 --global-batch-size 512 --step 1000 [--sequence 3] \
        [--tokenizer ../shared/data/20B_tokenizer.json] [--boundary per_row] [--json]

Reads through the same PythiaPreshuffledDataset the trainer uses and Megatron's sequential
sampler order: step s, sequence j is sample s * global_batch_size + j (like Pythia's
utils/batch_viewer.py).
"""

import argparse
import json

from _bootstrap import cli


BOUNDARY_HELP = "per_row (default), contiguous or contiguous_masked (megatron_mesh.data.pythia.BOUNDARIES)"
"""--boundary's values, named here so that --help imports nothing heavy (tests check the list)."""


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prefix of the merged .bin/.idx")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--step", type=int, required=True, help="0-based training step")
    parser.add_argument("--sequence", type=int, default=None, help="one sequence of the batch")
    parser.add_argument("--boundary", default="per_row", help=BOUNDARY_HELP)
    parser.add_argument("--tokenizer", default=None, help="decode the tokens with this tokenizer")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    from megatron_mesh.data.pythia import BOUNDARIES, PythiaPreshuffledDataset

    if args.boundary not in BOUNDARIES:
        parser.error(f"--boundary {args.boundary!r}: expected one of {', '.join(BOUNDARIES)}")
    dataset = PythiaPreshuffledDataset(args.data, args.seq_length, args.boundary)
    sequences = range(args.global_batch_size) if args.sequence is None else [args.sequence]
    decode = None
    if args.tokenizer:
        from transformers import PreTrainedTokenizerFast

        decode = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer).decode
    records = []
    for j in sequences:
        sample = args.step * args.global_batch_size + j
        if not 0 <= j < args.global_batch_size or sample >= len(dataset):
            cli.fail(f"step {args.step} sequence {j} is outside the data "
                     f"({len(dataset)} samples of {args.seq_length} tokens)")
        item = dataset[sample]
        record = {"step": args.step, "sequence": j, "sample": sample,
                  "rows": list(dataset.row_numbers(sample)), "tokens": item["tokens"].tolist(),
                  "labels": item["labels"].tolist()}
        if decode:
            record["text"] = decode(record["tokens"])
        records.append(record)
    if args.json:
        print(json.dumps(records if args.sequence is None else records[0]))
        return
    for r in records:
        print(f"step {r['step']} sequence {r['sequence']} = sample {r['sample']} = rows {r['rows']}")
        print(r.get("text", r["tokens"]))


if __name__ == "__main__":
    main()
