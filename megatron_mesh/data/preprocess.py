"""Text corpora -> Megatron indexed datasets, with worker processes and a bad-record report.

Inputs: ``.jsonl``/``.json`` (one JSON object per line, text under ``json_key``), the same
compressed as ``.gz`` or ``.zst``, and plain text files (``.txt``: one document per file).
Records are tokenized in order-preserving chunks, so the output is byte-identical for any
number of workers. Bad records (invalid UTF-8, invalid JSON, missing or non-string key) are
counted and reported with file and line; ``strict`` makes the first one fatal (and nothing is
written).
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from megatron_mesh.data.indexed import write_indexed_dataset
from megatron_mesh.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_mesh.errors import InputNotFoundError, MeshError

Record = Tuple[str, int, bytes]  # (file, 1-based line, raw bytes)
CHUNK = 64  # records per worker task


class BadRecordError(MeshError, ValueError):
    """Bad input records: the first one under strict=True, a jsonl line that is not a JSON object
    with the text field, or inputs that leave no document to write."""


@dataclass
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Report:
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bad: List[BadRecord] = field(default_factory=list)

    def summary(self, shown: int = 20) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        lines = [f"{self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
                 f"({rate:,.0f} tokens/s); {len(self.bad)} bad records"]
        lines += [f"  {bad}" for bad in self.bad[:shown]]
        if len(self.bad) > shown:
            lines.append(f"  ... and {len(self.bad) - shown} more")
        return "\n".join(lines)


def _open_lines(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def iter_records(paths: Sequence[Union[str, Path]]) -> Iterator[Tuple[str, int, bytes, bool]]:
    """(file, line, raw, is_json) for every record of every input, in order."""
    for path in map(Path, paths):
        if not path.is_file():
            raise InputNotFoundError(f"{path}: input file not found")
        if path.suffix == ".txt":
            yield str(path), 1, path.read_bytes(), False
            continue
        with _open_lines(path) as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield str(path), number, raw, True


def record_text(raw: bytes, is_json: bool, json_key: str) -> Union[str, BadRecord]:
    """The document text of a record, or why it is bad (file/line filled in by the caller)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord("", 0, f"invalid UTF-8 at byte {err.start}")
    if not is_json:
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRecord("", 0, f"invalid JSON ({err.msg} at column {err.colno})")
    if not isinstance(obj, dict) or json_key not in obj:
        return BadRecord("", 0, f"missing key {json_key!r}")
    if not isinstance(obj[json_key], str):
        return BadRecord("", 0, f"key {json_key!r} is {type(obj[json_key]).__name__}, not a string")
    return obj[json_key]


_WORKER_TOKENIZER: Optional[TextTokenizer] = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec)


def _encode_chunk(args) -> List[Union[List[int], BadRecord]]:
    chunk, json_key = args
    out = []
    for file, line, raw, is_json in chunk:
        text = record_text(raw, is_json, json_key)
        if isinstance(text, BadRecord):
            text.file, text.line = file, line
            out.append(text)
        else:
            out.append(_WORKER_TOKENIZER.encode(text) + [_WORKER_TOKENIZER.eod_id])
    return out


def _chunks(records, json_key):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == CHUNK:
            yield chunk, json_key
            chunk = []
    if chunk:
        yield chunk, json_key


def preprocess(
    inputs: Sequence[Union[str, Path]],
    output_prefix: Union[str, Path],
    tokenizer: str,
    *,
    workers: int = 1,
    json_key: str = "text",
    strict: bool = False,
    progress: bool = True,
    allow_empty: bool = False,
) -> Report:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx`` (EOD after every document). No
    documents is an error (nothing is written) unless ``allow_empty`` (a shard that may come
    out empty; tools/merge_datasets.py skips it)."""
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise InputNotFoundError(f"{missing[0]}: input file not found")
    vocab_size = load_tokenizer(tokenizer).vocab_size
    report = Report()
    start = time.time()
    tasks = _chunks(iter_records(inputs), json_key)
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer,))
        results = _ordered_bounded(pool, tasks, window=4 * workers)
    else:
        pool = None
        _init_worker(tokenizer)
        results = map(_encode_chunk, tasks)
    bar = _progress_bar(progress)

    def documents():
        for chunk in results:
            for item in chunk:
                if isinstance(item, BadRecord):
                    if strict:
                        raise BadRecordError(f"{item} (--strict)")
                    report.bad.append(item)
                    continue
                report.documents += 1
                report.tokens += len(item)
                yield item
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(tokens_per_s=f"{report.tokens / max(time.time() - start, 1e-9):,.0f}")
        if report.documents == 0 and not allow_empty:  # it would fail later, far from its cause
            why = f"{len(report.bad)} bad records, e.g. {report.bad[0]}" if report.bad else "empty input"
            raise BadRecordError(f"{', '.join(map(str, inputs))}: no documents to write ({why})")

    try:
        write_indexed_dataset(documents(), output_prefix, vocab_size)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    report.seconds = time.time() - start
    return report


def _ordered_bounded(pool, tasks, window: int):
    """Results in task order (same bytes for any worker count) with at most ``window`` chunks
    in flight: Pool.imap would read the whole input ahead into its task queue."""
    pending = collections.deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode_chunk, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="tokenizing", mininterval=1.0)
