"""Indexed datasets written here read back through megatron-core's own reader."""

import numpy
import pytest

from megatron_mesh.data.indexed import train_bpe_tokenizer, write_indexed_dataset


def test_round_trip_through_megatron_reader(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[5, 6, 7, 0], [9, 0], list(range(2, 300)) + [0]]
    prefix = tmp_path / "corpus_text_document"
    assert write_indexed_dataset(docs, prefix, vocab_size=50304) == sum(map(len, docs))
    ds = IndexedDataset(str(prefix))
    assert len(ds) == 3 and ds.index.dtype == numpy.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_large_vocabularies_use_int32(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    write_indexed_dataset([[70000, 1]], tmp_path / "big", vocab_size=100_000)
    ds = IndexedDataset(str(tmp_path / "big"))  # keep it alive: items are views of its mmap
    assert ds.index.dtype == numpy.int32 and ds[0].tolist() == [70000, 1]


def test_bpe_tokenizer_loads_with_transformers_and_has_neox_specials(tmp_path):
    from transformers import AutoTokenizer

    from megatron_mesh.data.local_corpus import pydoc_topics

    docs = pydoc_topics()[:20]
    tok = AutoTokenizer.from_pretrained(train_bpe_tokenizer(docs, 600, tmp_path / "tok"))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    assert tok.eos_token_id == 0 and len(tok) == 600
    text = "The for statement is used to iterate over the elements of a sequence."
    assert tok.decode(tok.encode(text)) == text
