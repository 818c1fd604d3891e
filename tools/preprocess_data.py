#!/usr/bin/env python
"""Tokenize text corpora into a Megatron indexed dataset (.bin/.idx), EOD after each document.

    python tools/preprocess_data.py --input corpus.jsonl.zst more.jsonl.gz notes.txt \
        --output-prefix data/corpus_text_document --tokenizer ../shared/data/20B_tokenizer.json \
        --workers 4 [--json-key text] [--strict]

--tokenizer: a tokenizer.json file, a local Hugging Face directory, a SentencePiece .model, or a
hub name (where the hub is reachable). Output is uint16 when the vocabulary fits, and is
byte-identical for any --workers. Bad records are reported with file:line; --strict makes the
first one fatal. Output files appear only when everything succeeded.
"""

import argparse

from _bootstrap import cli


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_input(parser, nargs="+", required=True, help="jsonl[.gz|.zst] or .txt files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write a 0-document dataset instead of failing when no document is "
                             "left (shards of a larger input; no reader opens one alone)")
    args = parser.parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    from megatron_mesh.data.preprocess import preprocess

    report = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                        json_key=args.json_key, strict=args.strict, progress=not args.no_progress,
                        allow_empty=args.allow_empty)
    print(report.summary())
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx")


if __name__ == "__main__":
    main()
