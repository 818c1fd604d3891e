"""Token documents for evaluation and probes: an indexed dataset or a jsonl file.

``read_documents(source, tokenizer)`` yields one list of token ids per document:
- ``PREFIX`` with ``PREFIX.bin`` / ``PREFIX.idx`` next to it (a Megatron indexed dataset, as
  tools/preprocess_data.py writes it; already tokenized, ``tokenizer`` unused); a document is
  every sequence up to the next document boundary, so sentence-split data gives whole documents;
- ``FILE.jsonl`` (one JSON object per line, the text under ``key``, default 'text'), tokenized
  with ``tokenizer`` (any spec ``megatron_mesh.data.tokenizer.load_tokenizer`` accepts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Optional

from megatron_mesh.data.preprocess import BadRecordError
from megatron_mesh.errors import ConfigError, InputNotFoundError


def is_indexed_prefix(source) -> bool:
    return Path(f"{source}.bin").is_file() and Path(f"{source}.idx").is_file()


def _half_indexed_prefix(source) -> bool:
    """One of ``source.bin`` / ``source.idx`` and no file ``source``: meant as an indexed
    dataset, so reading it names the missing half rather than 'nor a jsonl file'."""
    return not Path(source).is_file() and (Path(f"{source}.bin").is_file()
                                           or Path(f"{source}.idx").is_file())


def read_documents(source, tokenizer: Optional[str] = None, key: str = "text",
                   append_eod: bool = False) -> Iterator[List[int]]:
    """Token ids of each document of ``source`` in file order (see the module docstring).
    ``append_eod`` ends jsonl documents with the tokenizer's end-of-document token, as
    preprocessing does (indexed datasets already hold whatever preprocessing wrote)."""
    if is_indexed_prefix(source) or _half_indexed_prefix(source):
        yield from _indexed_documents(str(source))
        return
    path = Path(source)
    if not path.is_file():
        raise InputNotFoundError(f"{source}: neither an indexed dataset prefix ({source}.bin/.idx) "
                                 f"nor a jsonl file")
    if tokenizer is None:
        raise ConfigError(f"{source}: a jsonl file needs a tokenizer (--tokenizer)")
    from megatron_mesh.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    for _, text in _jsonl_texts(path, key):
        ids = tok.encode(text)
        if append_eod:
            ids = ids + [tok.eod_id]
        if ids:
            yield ids


def count_documents(source) -> int:
    """How many documents ``read_documents(source)`` yields, for progress totals: an indexed
    dataset's non-empty documents (from its index), or a jsonl file's non-blank lines (a text
    that tokenizes to nothing is skipped when read, so that count may be one or two high)."""
    if is_indexed_prefix(source) or _half_indexed_prefix(source):
        from megatron_mesh.data.integrity import open_indexed_dataset

        dataset = open_indexed_dataset(str(source))  # kept while its memory map is read
        bounds = dataset.document_indices  # [documents + 1]
        return int((bounds[1:] > bounds[:-1]).sum())
    with open(source, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _indexed_documents(prefix: str) -> Iterator[List[int]]:
    """Whole documents: the sequences between consecutive document boundaries, joined (one
    sequence per document, or one per sentence for tools/preprocess_data.py --split-sentences).
    Opened through ``open_indexed_dataset``: a missing, short or empty file is named."""
    import numpy as np

    from megatron_mesh.data.integrity import open_indexed_dataset

    dataset = open_indexed_dataset(prefix)
    bounds = dataset.document_indices  # [documents + 1] sequence offsets, from 0 to len(dataset)
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if stop > start:
            yield np.concatenate(dataset[start:stop]).tolist()


def _jsonl_texts(path: Path, key: str):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadRecordError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise BadRecordError(f"{path}:{number}: expected an object with a string {key!r} field")
            yield number, record[key]


def fixed_length_samples(documents: Iterator[List[int]], seq_length: int, num_samples: int,
                         source: str = "data") -> List[List[int]]:
    """The first ``num_samples`` samples of exactly ``seq_length`` tokens: each document's first
    ``seq_length`` tokens (shorter documents are skipped), as probes use one sample per
    document. ConfigError naming ``source`` if there are not enough."""
    samples: List[List[int]] = []
    for doc in documents:
        if len(doc) >= seq_length:
            samples.append(doc[:seq_length])
            if len(samples) == num_samples:
                return samples
    raise ConfigError(f"{source}: only {len(samples)} documents have >= {seq_length} tokens, "
                     f"{num_samples} samples requested (lower --samples or --seq-length)")
