#!/usr/bin/env python
"""Throughput of the hashes a checkpoint integrity manifest could use, on one CPU core.

    python tools/benchmark_hash.py [--mib 256] [--input ITER_DIR]

Hashes --mib MiB of random bytes in memory (8 MiB chunks, best of 3) with each candidate and
prints GB/s; megatron_mesh.checkpoint.manifest uses the fastest, xxh3-128. With --input (or --checkpoint),
also times checking an iteration directory against its manifest (file reads included; run it
twice to see a warm page cache).
"""

import argparse
import hashlib
import os
import time
import zlib
from pathlib import Path

from _bootstrap import cli

import xxhash

CHUNK = 8 << 20


def _crc32():
    class Crc:
        value = 0

        def update(self, data):
            self.value = zlib.crc32(data, self.value)
    return Crc()


CANDIDATES = {"xxh3_128": xxhash.xxh3_128, "xxh3_64": xxhash.xxh3_64, "xxh64": xxhash.xxh64,
              "crc32": _crc32, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b,
              "md5": hashlib.md5}


def throughput(make, data: memoryview, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start, digest = time.perf_counter(), make()
        for i in range(0, len(data), CHUNK):
            digest.update(data[i:i + CHUNK])
        best = min(best, time.perf_counter() - start)
    return len(data) / best / 1e9


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    cli.add_input(parser, "--checkpoint", default=None, help="an iteration directory with a manifest")
    args = parser.parse_args(argv)
    data = memoryview(os.urandom(args.mib << 20))
    for name, make in CANDIDATES.items():
        print(f"{name:10s} {throughput(make, data):6.2f} GB/s")
    if args.input:
        from megatron_mesh.checkpoint import manifest as checkpoint_manifest

        ckpt = Path(args.input)
        size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
        start = time.perf_counter()
        problems = checkpoint_manifest.problems(ckpt)
        seconds = time.perf_counter() - start
        print(f"verify {ckpt}: {size / 1e9:.2f} GB in {seconds:.2f} s = {size / seconds / 1e9:.2f} "
              f"GB/s, {len(problems)} problems")


if __name__ == "__main__":
    main()
