#!/usr/bin/env python
"""Build an offline English corpus (train + held-out) from Debian's documentation packages.

    python tools/build_corpus.py --output data/corpus --tokenizer ../shared/data/20B_tokenizer.json \
        [--packages linux-doc-6.1 python3.11-doc] [--no-install] [--valid-fraction 0.02] \
        [--max-documents N] [--workers 2] [--keep-text] [--force]

Unless --no-install, missing packages are installed first (as root, from a Debian mirror):

    apt-get install -y --no-install-recommends linux-doc-6.1 python3.11-doc

Their reST/HTML is turned into plain-text documents (deduplicated, split by a hash of the
source path; see megatron_mesh/corpora/debian_docs.py) in DIR/train.jsonl and DIR/valid.jsonl
(kept only with --keep-text), which the code behind tools/preprocess_data.py tokenizes into
DIR/train_text_document.{bin,idx} and DIR/valid_text_document.{bin,idx} (EOD after every
document). Documents, characters and tokens (EOD included) per split and per package, package
versions, the tokenizer and the settings are printed and written to DIR/corpus.json. DIR
appears only when all of it is done.
"""

import argparse
import json
import time
from pathlib import Path

from _bootstrap import cli

import numpy

DEFAULT_PACKAGES_HELP = "linux-doc-6.1 python3.11-doc"
"""megatron_mesh.corpora.debian_docs.DEFAULT_PACKAGES, named here so that --help imports nothing
heavy (tests check they agree)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_output(parser, "--out", required=True, type=Path, help="output directory")
    parser.add_argument("--tokenizer", required=True, help="e.g. 20B_tokenizer.json")
    parser.add_argument("--packages", nargs="+", default=None,
                        help=f"Debian documentation packages (default: {DEFAULT_PACKAGES_HELP})")
    parser.add_argument("--no-install", action="store_true",
                        help="use the packages as installed; never call apt-get")
    parser.add_argument("--valid-fraction", type=float, default=0.02)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="keep at most N documents per package (a quick sample)")
    parser.add_argument("--min-chars", type=int, default=200, help="drop shorter documents")
    parser.add_argument("--max-chars", type=int, default=20_000,
                        help="cut longer files between paragraphs into pieces of about this size")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    parser.add_argument("--keep-text", action="store_true",
                        help="keep DIR/{train,valid}.jsonl (the extracted text) for inspection")
    cli.add_force(parser)
    args = parser.parse_args(argv)
    if not 0 < args.valid_fraction < 1:
        parser.error("--valid-fraction must be between 0 and 1")
    return args


def document_tokens(prefix: Path) -> numpy.ndarray:
    """Token count of every document, read from the .idx (checked against the .bin first)."""
    from megatron_mesh.data.integrity import check_indexed_dataset

    header = check_indexed_dataset(str(prefix))
    return numpy.fromfile(f"{prefix}.idx", dtype=numpy.int32, count=header.sequences,
                          offset=header.header_bytes)


def tokenize(work: Path, stats, args) -> dict:
    """{split: {package: tokens}}; each split's documents come package by package, so the
    package of a document follows from the per-package document counts."""
    from megatron_mesh.corpora.debian_docs import SPLITS
    from megatron_mesh.data.preprocess import preprocess

    tokens = {}
    for split in SPLITS:
        prefix = work / f"{split}_text_document"
        preprocess([work / f"{split}.jsonl"], prefix, args.tokenizer, workers=args.workers,
                   strict=True, progress=False)
        lengths = document_tokens(prefix)
        counts = [stats[p].splits[split].documents for p in args.packages]
        assert sum(counts) == len(lengths), (split, sum(counts), len(lengths))
        bounds = numpy.cumsum([0] + counts)
        tokens[split] = {p: int(lengths[a:b].sum())
                         for p, a, b in zip(args.packages, bounds[:-1], bounds[1:])}
    return tokens


def summarise(args, versions, stats, tokens, seconds) -> dict:
    from megatron_mesh.corpora.debian_docs import SPLITS

    def split_entry(split, packages):
        return {"documents": sum(stats[p].splits[split].documents for p in packages),
                "characters": sum(stats[p].splits[split].characters for p in packages),
                "tokens": sum(tokens[split][p] for p in packages)}

    packages = {p: {"version": versions[p], "files": stats[p].files,
                    "dropped_short": stats[p].short, "dropped_duplicates": stats[p].duplicates,
                    **{s: split_entry(s, [p]) for s in SPLITS}} for p in args.packages}
    return {"splits": {s: split_entry(s, args.packages) for s in SPLITS}, "packages": packages,
            "outputs": {s: f"{s}_text_document" for s in SPLITS},
            "tokenizer": str(args.tokenizer), "tokens_include_eod": True,
            "valid_fraction": args.valid_fraction, "max_documents": args.max_documents,
            "min_chars": args.min_chars, "max_chars": args.max_chars,
            "seconds": round(seconds, 1)}


def build(args) -> dict:
    from megatron_mesh.corpora import debian_docs
    from megatron_mesh.corpora.debian_docs import SPLITS
    from megatron_mesh.data.tokenizer import load_tokenizer
    from megatron_mesh.errors import ConfigError
    from megatron_mesh.fs import atomic_directory, check_writable

    start = time.time()
    check_writable(args.output, args.force)    # refuse before installing anything
    load_tokenizer(args.tokenizer)             # a bad path fails now, not after extraction
    if not args.no_install:
        debian_docs.install_packages(args.packages)
    sources = {p: debian_docs.select_sources(debian_docs.package_files(p)) for p in args.packages}
    versions = {p: debian_docs.installed_version(p) for p in args.packages}
    with atomic_directory(args.output, args.force) as work:
        stats = debian_docs.write_splits(sources, work, valid_fraction=args.valid_fraction,
                                         max_documents=args.max_documents, min_chars=args.min_chars,
                                         max_chars=args.max_chars)
        for split in SPLITS:
            if not any(stats[p].splits[split].documents for p in args.packages):
                raise ConfigError(f"the {split} split is empty (raise --max-documents or "
                                 "change --valid-fraction)")
        tokens = tokenize(work, stats, args)
        if not args.keep_text:  # the .bin/.idx are the product; half the size without the text
            for split in SPLITS:
                (work / f"{split}.jsonl").unlink()
        report = summarise(args, versions, stats, tokens, time.time() - start)
        (work / "corpus.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    from megatron_mesh.corpora.debian_docs import DEFAULT_PACKAGES

    args.packages = args.packages or list(DEFAULT_PACKAGES)
    report = build(args)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.output}/{{train,valid}}_text_document.{{bin,idx}} and corpus.json")


if __name__ == "__main__":
    main()
