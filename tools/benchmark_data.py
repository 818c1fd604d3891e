#!/usr/bin/env python
"""Data-pipeline measurements: preprocessing throughput and the cost of opening a huge index.

    python tools/benchmark_data.py preprocess --tokenizer T --workers 1 2 [--mb 20]
    python tools/benchmark_data.py open-index --rows 122000000 [--dir /tmp/bench]

`preprocess` tokenizes a jsonl corpus built from Python's own documentation (repeated to about
--mb megabytes) and reports tokens/s per run. `open-index` writes a synthetic Pythia-shaped
index of --rows rows of 2049 tokens (the .bin is a sparse file of the right length) and times
opening it through the integrity check and PythiaPreshuffledDataset, with peak RSS.
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from _bootstrap import cli

import numpy


def bench_preprocess(args):
    from megatron_mesh.corpora.python_docs import python_docs_corpus
    from megatron_mesh.data.preprocess import preprocess

    work = Path(args.dir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    lines = [json.dumps({"text": d}) + "\n" for d in python_docs_corpus()]
    repeats = max(1, round(args.mb * 1e6 / sum(map(len, lines))))
    corpus.write_text("".join(lines) * repeats)
    for workers in args.workers:
        report = preprocess([corpus], work / f"out{workers}", args.tokenizer, workers=workers, progress=False)
        rate = report.tokens / report.seconds
        print(f"workers {workers}: {report.tokens:,} tokens in {report.seconds:.1f} s = "
              f"{rate:,.0f} tokens/s ({rate / workers:,.0f} per worker)")


def write_synthetic_index(prefix: Path, rows: int) -> None:
    """A valid MMIDIDX index of `rows` rows of 2049 uint16 tokens; the .bin is sparse."""
    import struct

    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<QQ", rows, rows + 1))
        step = 1 << 24
        for start in range(0, rows, step):  # sizes
            numpy.full(min(step, rows - start), 2049, dtype=numpy.int32).tofile(f)
        for start in range(0, rows, step):  # byte pointers
            (numpy.arange(start, min(start + step, rows), dtype=numpy.int64) * 4098).tofile(f)
        for start in range(0, rows + 1, step):  # document indices
            numpy.arange(start, min(start + step, rows + 1), dtype=numpy.int64).tofile(f)
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(rows * 2049 * 2)


def bench_open(args):
    from megatron_mesh.data.integrity import check_indexed_dataset
    from megatron_mesh.data.pythia import PythiaPreshuffledDataset

    work = Path(args.dir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    prefix = work / "synthetic"
    start = time.time()
    write_synthetic_index(prefix, args.rows)
    print(f"wrote index for {args.rows:,} rows ({args.rows * 2049:,} tokens) in {time.time() - start:.1f} s; "
          f"idx {Path(f'{prefix}.idx').stat().st_size / 1e9:.2f} GB")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.time()
    check_indexed_dataset(str(prefix))
    checked = time.time() - start
    ds = PythiaPreshuffledDataset(str(prefix), 4096)
    opened = time.time() - start
    print(f"integrity check {checked:.2f} s; PythiaPreshuffledDataset open (incl. check and a "
          f"scan of all row lengths) {opened:.2f} s; {len(ds):,} samples of 4096; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB "
          f"(before: {rss0:.2f} GB)")
    if not args.keep:
        for suffix in (".idx", ".bin"):
            Path(f"{prefix}{suffix}").unlink()


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("preprocess")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--mb", type=float, default=20)
    p.add_argument("--dir", default=None)
    o = sub.add_parser("open-index")
    o.add_argument("--rows", type=int, default=122_000_000)
    o.add_argument("--dir", default=None)
    o.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    bench_preprocess(args) if args.what == "preprocess" else bench_open(args)


if __name__ == "__main__":
    main()
