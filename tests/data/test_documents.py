"""Reading evaluation documents from indexed datasets and jsonl files."""

import json

import pytest

from toy_tasks import tiny_export


def test_indexed_documents_come_back_in_order(tmp_path, megatron_world):
    from megatron_mesh.data.documents import fixed_length_samples, read_documents
    from megatron_mesh.data.indexed import write_indexed_dataset

    docs = [[5, 6, 7], [1] * 10, [2, 3, 4, 5, 6, 7]]
    write_indexed_dataset(docs, tmp_path / "set", vocab_size=100)
    assert list(read_documents(tmp_path / "set")) == docs
    assert fixed_length_samples(iter(docs), 4, 2) == [[1, 1, 1, 1], [2, 3, 4, 5]]
    with pytest.raises(ValueError, match="only 2 documents have >= 4 tokens, 3 samples requested"):
        fixed_length_samples(iter(docs), 4, 3)


def test_sentence_split_documents_come_back_whole(tmp_path, megatron_world):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_mesh.data.documents import read_documents

    docs = [[[5, 6], [7, 8, 9]], [[1, 2, 3]], [[4], [4], [0, 2]]]  # documents of sentences
    builder = IndexedDatasetBuilder(str(tmp_path / "set.bin"), dtype=np.uint16)
    for doc in docs:
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(str(tmp_path / "set.idx"))
    assert list(read_documents(tmp_path / "set")) == [[5, 6, 7, 8, 9], [1, 2, 3], [4, 4, 0, 2]]


def test_jsonl_is_tokenized_and_bad_lines_are_named(megatron_world, tmp_path):
    from megatron_mesh.data.documents import read_documents
    from megatron_mesh.data.tokenizer import load_tokenizer

    tokenizer = str(tiny_export(tmp_path))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": "again"}) + "\n")
    tok = load_tokenizer(tokenizer)
    assert list(read_documents(good, tokenizer)) == [tok.encode("hello world"), tok.encode("again")]
    assert list(read_documents(good, tokenizer, append_eod=True))[1] == tok.encode("again") + [tok.eod_id]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        list(read_documents(bad, tokenizer))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        list(read_documents(bad, tokenizer))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(read_documents(good))
    with pytest.raises(FileNotFoundError, match="neither an indexed dataset prefix"):
        list(read_documents(tmp_path / "missing"))


def test_count_documents_of_indexed_and_jsonl(tmp_path):
    """The progress totals: non-empty documents of an index (read from its memory map, which
    must outlive the dataset object), non-blank lines of a jsonl file."""
    from megatron_mesh.data.documents import count_documents, read_documents
    from megatron_mesh.data.indexed import write_indexed_dataset

    write_indexed_dataset([[1, 2, 3], [4], [5, 6]], str(tmp_path / "docs"), 16)
    assert count_documents(tmp_path / "docs") == len(list(read_documents(tmp_path / "docs"))) == 3
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert count_documents(tmp_path / "d.jsonl") == 2
