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
def atomic_indexed_builder(prefix, dtype):
    """An IndexedDatasetBuilder writing to temporary names; ``prefix.bin/.idx`` appear (by
    rename) only if the block finishes, so an interrupted write never looks like a dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    try:
        yield builder
        builder.finalize(f"{tmp}.idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


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
    }, indent=2))
    return str(out)
