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


def _sentence_split(prefix, documents, dtype):
    """megatron-core's builder: one sequence per sentence, a boundary after each document."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32])
def test_concatenation_is_byte_identical_to_megatron_add_index(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from megatron_mesh.data.indexed import concatenate_indexed

    rng = numpy.random.default_rng(0)
    shards = [_sentence_split(tmp_path / f"shard{i}", [
        [rng.integers(0, 60000, rng.integers(1, 9)).tolist() for _ in range(rng.integers(1, 4))]
        for _ in range(n)], dtype) for i, n in enumerate([5, 1, 0, 12])]
    reference = IndexedDatasetBuilder(str(tmp_path / "reference.bin"), dtype=dtype)
    for shard in shards:
        reference.add_index(shard)
    reference.finalize(str(tmp_path / "reference.idx"))

    # chunk=3 so that every array crosses chunk boundaries
    assert concatenate_indexed(shards, tmp_path / "out" / "merged", chunk=3) == len(
        IndexedDataset(str(tmp_path / "reference")))
    for suffix in (".bin", ".idx"):
        got = (tmp_path / "out" / f"merged{suffix}").read_bytes()
        assert got == (tmp_path / f"reference{suffix}").read_bytes(), suffix
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_failed_concatenation_leaves_no_dataset(tmp_path):
    from megatron_mesh.data.indexed import concatenate_indexed
    from megatron_mesh.data.integrity import DatasetIntegrityError

    a = _sentence_split(tmp_path / "a", [[[1, 2]]], numpy.uint16)
    b = _sentence_split(tmp_path / "b", [[[3]]], numpy.int32)
    with pytest.raises(DatasetIntegrityError, match="different token dtypes"):
        concatenate_indexed([a, b], tmp_path / "merged")
    (tmp_path / "b.bin").write_bytes(b"")  # shorter than its index says
    with pytest.raises(DatasetIntegrityError, match="b.bin"):
        concatenate_indexed([a, str(tmp_path / "b")], tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx", "b.bin", "b.idx"]


def test_large_vocabularies_use_int32(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    write_indexed_dataset([[70000, 1]], tmp_path / "big", vocab_size=100_000)
    ds = IndexedDataset(str(tmp_path / "big"))  # keep it alive: items are views of its mmap
    assert ds.index.dtype == numpy.int32 and ds[0].tolist() == [70000, 1]


def test_bpe_tokenizer_loads_with_transformers_and_has_neox_specials(tmp_path):
    from transformers import AutoTokenizer

    from megatron_mesh.corpora.python_docs import pydoc_topics

    docs = pydoc_topics()[:20]
    tok = AutoTokenizer.from_pretrained(train_bpe_tokenizer(docs, 600, tmp_path / "tok"))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    assert tok.eos_token_id == 0 and len(tok) == 600
    text = "The for statement is used to iterate over the elements of a sequence."
    assert tok.decode(tok.encode(text)) == text
