"""Checks run when an indexed dataset is opened: each failure names the file and the numbers.

Layout of ``.idx`` (Megatron/NeoX "MMIDIDX"): 9-byte magic ``MMIDIDX\\x00\\x00``, uint64 version
(1), uint8 dtype code, uint64 sequence count, uint64 document count, then int32 sizes,
int64 byte pointers into ``.bin``, int64 document indices.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy

from megatron_mesh.errors import MeshError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
          6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}


class DatasetIntegrityError(MeshError, ValueError):
    """An indexed dataset or its tokenizer does not match what it claims or what is configured."""


@dataclass
class IndexHeader:
    dtype: type
    sequences: int
    documents: int
    header_bytes: int


def read_header(prefix: str) -> IndexHeader:
    idx = f"{prefix}.idx"
    _check_present(prefix)
    size = os.path.getsize(idx)
    if size < HEADER_BYTES:  # struct.unpack would fail on the short read, naming nothing
        raise DatasetIntegrityError(
            f"{idx}: {size} bytes{' (empty)' if not size else ''}, shorter than the "
            f"{HEADER_BYTES}-byte header (magic, version, dtype, sequence and document counts)")
    with open(idx, "rb") as f:
        magic = f.read(9)
        if magic != MAGIC:
            raise DatasetIntegrityError(f"{idx}: bad magic {magic!r}, expected {MAGIC!r}")
        (version,) = struct.unpack("<Q", f.read(8))
        if version != 1:
            raise DatasetIntegrityError(f"{idx}: index version {version}, expected 1")
        (code,) = struct.unpack("<B", f.read(1))
        if code not in DTYPES:
            raise DatasetIntegrityError(f"{idx}: unknown dtype code {code}, expected one of {sorted(DTYPES)}")
        sequences, documents = struct.unpack("<QQ", f.read(16))
    return IndexHeader(DTYPES[code], sequences, documents, HEADER_BYTES)


def _check_present(prefix: str) -> None:
    """Both halves exist; when only one does, the message starts with the missing one."""
    missing = [f"{prefix}{suffix}" for suffix in (".bin", ".idx")
               if not Path(f"{prefix}{suffix}").is_file()]
    if len(missing) == 2:
        raise DatasetIntegrityError(f"{prefix}: expected {prefix}.bin and {prefix}.idx")
    if missing:
        raise DatasetIntegrityError(
            f"{missing[0]}: no such file; the dataset {prefix} needs {prefix}.bin and {prefix}.idx")


def index_arrays(prefix: str, header: IndexHeader):
    """The .idx arrays as read-only memory maps (nothing is loaded): int32 sizes [sequences],
    int64 byte pointers [sequences], int64 document indices [documents]."""
    if not header.sequences and not header.documents:
        empty = numpy.zeros(0, dtype=numpy.int64)
        return empty.astype(numpy.int32), empty, empty
    index = numpy.memmap(f"{prefix}.idx", mode="r", offset=header.header_bytes, dtype=numpy.uint8)
    n = header.sequences
    return (index[: 4 * n].view(numpy.int32), index[4 * n : 12 * n].view(numpy.int64),
            index[12 * n :].view(numpy.int64))


def check_indexed_dataset(prefix: str) -> IndexHeader:
    """Magic, version, dtype, index length and .bin length agree."""
    header = read_header(prefix)
    idx, binfile = f"{prefix}.idx", f"{prefix}.bin"
    expected_idx = header.header_bytes + header.sequences * 12 + header.documents * 8
    if os.path.getsize(idx) != expected_idx:
        raise DatasetIntegrityError(
            f"{idx}: {os.path.getsize(idx)} bytes, but {header.sequences} sequences and "
            f"{header.documents} document indices need {expected_idx}")
    tokens = 0
    if header.sequences:
        n = header.sequences
        sizes, pointers, documents = index_arrays(prefix, header)
        _check_pointers(idx, sizes, pointers, numpy.dtype(header.dtype).itemsize)
        if not len(documents):
            raise DatasetIntegrityError(f"{idx}: {n} sequences but no document indices")
        if documents[-1] != n:
            raise DatasetIntegrityError(
                f"{idx}: the last document index is {documents[-1]}, expected {n} (the sequence count)")
        tokens = int(pointers[-1] // numpy.dtype(header.dtype).itemsize + sizes[-1])
    expected_bin = tokens * numpy.dtype(header.dtype).itemsize
    size = os.path.getsize(binfile)
    if size != expected_bin:
        raise DatasetIntegrityError(
            f"{binfile}: {size:,} bytes{' (the file is empty)' if not size else ''}, but {idx} "
            f"describes {tokens:,} {numpy.dtype(header.dtype).name} tokens = {expected_bin:,} bytes")
    return header


def open_indexed_dataset(prefix: str):
    """Megatron's ``IndexedDataset`` on ``prefix`` once ``check_indexed_dataset`` passes and the
    dataset holds tokens. Every reader opens datasets here: megatron memory-maps the .bin, and
    numpy cannot map an empty file, so a 0-document dataset would otherwise fail with a bare
    'cannot mmap an empty file' naming no file. (``check_indexed_dataset`` itself accepts empty
    datasets: an empty shard is a valid input to ``concatenate_indexed``.)"""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    header = check_indexed_dataset(prefix)
    if not os.path.getsize(f"{prefix}.bin"):  # checked: the index describes no tokens either
        what = (f"{header.sequences:,} sequences hold no tokens" if header.sequences
                else "contains no documents")
        raise DatasetIntegrityError(
            f"{prefix}.idx: {what}; re-run tools/preprocess_data.py on a non-empty input")
    return IndexedDataset(prefix)


def _check_pointers(idx: str, sizes, pointers, itemsize: int, chunk: int = 1 << 24) -> None:
    """pointers[0] == 0 and each pointer = previous + previous size (checked in chunks)."""
    if pointers[0] != 0:
        raise DatasetIntegrityError(f"{idx}: the first sequence starts at byte {pointers[0]}, expected 0")
    for start in range(1, len(pointers), chunk):
        stop = min(start + chunk, len(pointers))
        expected = pointers[start - 1 : stop - 1] + sizes[start - 1 : stop - 1].astype(numpy.int64) * itemsize
        bad = numpy.flatnonzero(pointers[start:stop] != expected)
        if len(bad):
            i = start + int(bad[0])
            raise DatasetIntegrityError(
                f"{idx}: sequence {i} starts at byte {pointers[i]}, expected {expected[bad[0]]} "
                f"(previous start + previous size)")


def check_token_range(dataset, prefix: str, vocab_size: int, samples: int = 64) -> None:
    """Token ids below ``vocab_size`` in up to ``samples`` evenly spread documents."""
    n = len(dataset)
    for i in sorted({int(j) for j in numpy.linspace(0, n - 1, num=min(samples, n))} if n else ()):
        top = int(numpy.max(dataset[i])) if len(dataset[i]) else -1
        if top >= vocab_size:
            raise DatasetIntegrityError(
                f"{prefix}: sequence {i} holds token id {top}, at or above the model's padded "
                f"vocabulary size {vocab_size}")


def check_tokenizer_vocab(tokenizer_vocab: int, model_vocab: int, source: str) -> None:
    if tokenizer_vocab > model_vocab:
        raise DatasetIntegrityError(
            f"tokenizer {source} has {tokenizer_vocab} ids but the model's vocab_size is "
            f"{model_vocab}: set model.vocab_size >= {tokenizer_vocab} (padded, e.g. 50304 for GPT-NeoX-20B)")
