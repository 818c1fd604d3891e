"""Writing Megatron indexed datasets (.bin/.idx) and building a small BPE tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, List

import numpy
import torch

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"  # ids 0 and 1, as in GPT-NeoX-20B


def token_dtype(vocab_size: int):
    """uint16 when every id fits (half the disk of int32), else int32 (Megatron's choice)."""
    return numpy.uint16 if vocab_size <= 65536 else numpy.int32


@contextlib.contextmanager
def atomic_pair(prefix):
    """Yields a temporary prefix to write ``.bin`` and ``.idx`` under; they become
    ``prefix.bin/.idx`` (by rename) only if the block finishes, and are deleted if it fails, so
    an interrupted write never looks like a dataset."""
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


@contextlib.contextmanager
def atomic_indexed_builder(prefix, dtype):
    """An IndexedDatasetBuilder whose dataset appears at ``prefix`` only when complete."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    with atomic_pair(prefix) as tmp:
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        try:
            yield builder
        finally:
            builder.data_file.close()
        builder.finalize(f"{tmp}.idx")


def concatenate_indexed(prefixes: List[str], output_prefix, chunk: int = 1 << 22) -> int:
    """Write the datasets ``prefixes`` (checked: same dtype, consistent .idx/.bin) one after
    another as ``output_prefix.bin/.idx``, atomically; returns the sequence count. The result is
    byte-identical to megatron-core's ``IndexedDatasetBuilder.add_index`` + ``finalize``, but the
    index is streamed ``chunk`` entries at a time: the builder keeps every sequence length and
    pointer as a Python int (~130 bytes per sequence measured, ~20 GB for the 146M of the Pile)."""
    import shutil

    from megatron_mesh.data.integrity import DatasetIntegrityError, check_indexed_dataset

    headers = [check_indexed_dataset(p) for p in prefixes]
    if len({h.dtype for h in headers}) != 1:
        raise DatasetIntegrityError(
            f"shards have different token dtypes: {sorted({h.dtype.__name__ for h in headers})}")
    with atomic_pair(output_prefix) as tmp:
        with open(f"{tmp}.idx", "wb") as idx:
            _write_concatenated_index(idx, prefixes, headers, chunk)
        with open(f"{tmp}.bin", "wb") as out:
            for p in prefixes:
                with open(f"{p}.bin", "rb") as shard:
                    shutil.copyfileobj(shard, out, 1 << 24)
    return sum(h.sequences for h in headers)


def _write_concatenated_index(idx, prefixes, headers, chunk: int) -> None:
    """The .idx of the shards one after another (layout in ``megatron_mesh.data.integrity``)."""
    import struct

    from megatron_mesh.data.integrity import DTYPES, MAGIC, index_arrays

    arrays = [index_arrays(p, h) for p, h in zip(prefixes, headers)]  # memory maps

    def write(array, shift=0):
        for start in range(0, len(array), chunk):
            idx.write((array[start:start + chunk] + numpy.int64(shift)).astype(array.dtype).tobytes())

    documents = 1 + sum(max(h.documents - 1, 0) for h in headers)  # one leading 0, as the builder
    code = {dtype: c for c, dtype in DTYPES.items()}[headers[0].dtype]
    sequences = sum(h.sequences for h in headers)
    idx.write(MAGIC + struct.pack("<QB", 1, code) + struct.pack("<QQ", sequences, documents))
    for sizes, _, _ in arrays:
        write(sizes)
    byte_offset = 0
    for (_, pointers, _), p in zip(arrays, prefixes):
        write(pointers, byte_offset)  # each shard's pointers start at 0 (checked)
        byte_offset += os.path.getsize(f"{p}.bin")
    write(numpy.zeros(1, dtype=numpy.int64))
    sequence_offset = 0
    for (_, _, docs), header in zip(arrays, headers):
        write(docs[1:], sequence_offset)  # each shard's document indices start with its own 0
        sequence_offset += header.sequences


def write_indexed_dataset(documents: Iterable[List[int]], prefix: str, vocab_size: int) -> int:
    """Write token documents to ``prefix.bin/.idx`` (atomically); returns the token count."""
    tokens = 0
    with atomic_indexed_builder(prefix, token_dtype(vocab_size)) as builder:
        for doc in documents:
            builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
            tokens += len(doc)
    return tokens


def train_bpe_tokenizer(documents: List[str], vocab_size: int, out_dir: str) -> str:
    """A byte-level BPE (GPT-NeoX style special tokens) saved as a Hugging Face directory that
    ``AutoTokenizer`` and Megatron's HuggingFaceTokenizer load offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN, "bos_token": EOD_TOKEN, "unk_token": EOD_TOKEN,
        "pad_token": PAD_TOKEN, "model_max_length": 1_000_000,
        "model_input_names": ["input_ids", "attention_mask"],  # GPT-NeoX's: no token_type_ids
    }, indent=2))
    return str(out)
