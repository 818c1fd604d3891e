"""Every reader of an indexed dataset names the file it cannot open.

Megatron's IndexedDataset memory-maps the .bin; on a 0-document dataset (an empty .bin) numpy
fails with a bare 'cannot mmap an empty file' naming nothing. Evaluation and probing
(``read_documents``), the training check (``_check_data``) and the Pythia reader all go through
``open_indexed_dataset``, which names the file and the problem first.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_mesh.data.indexed import write_indexed_dataset
from megatron_mesh.data.integrity import DatasetIntegrityError, open_indexed_dataset


def read_all_documents(prefix):
    from megatron_mesh.data.documents import read_documents

    return list(read_documents(prefix))


def training_check(prefix):
    from megatron_mesh.training import providers

    args = SimpleNamespace(data_path=["1.0", str(prefix)], train_data_path=None, valid_data_path=None,
                           test_data_path=None, padded_vocab_size=50304, tokenizer_model="tok",
                           tokenizer_type=None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(providers, "get_tokenizer", lambda: SimpleNamespace(vocab_size=50277))
        providers._check_data(args)


def pythia_rows(prefix):
    from megatron_mesh.data.pythia import PythiaPreshuffledDataset

    return PythiaPreshuffledDataset(str(prefix), 2048)


READERS = [pytest.param(read_all_documents, id="documents"), pytest.param(training_check, id="training"),
           pytest.param(pythia_rows, id="pythia"), pytest.param(open_indexed_dataset, id="open")]


@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "ok"
    write_indexed_dataset([[1, 2, 3, 0], [4, 5, 0], list(range(100)) + [0]], prefix, vocab_size=50304)
    return prefix


@pytest.mark.parametrize("reader", READERS)
def test_zero_documents_are_named(tmp_path, reader):
    write_indexed_dataset([], tmp_path / "empty", vocab_size=50304)
    with pytest.raises(DatasetIntegrityError, match=r"empty\.idx: contains no documents; re-run "
                                                    r"tools/preprocess_data\.py on a non-empty input"):
        reader(tmp_path / "empty")


@pytest.mark.parametrize("reader", READERS)
def test_documents_without_tokens_are_named(tmp_path, reader):
    write_indexed_dataset([[], []], tmp_path / "blank", vocab_size=50304)
    with pytest.raises(DatasetIntegrityError, match=r"blank\.idx: 2 sequences hold no tokens; re-run"):
        reader(tmp_path / "blank")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("suffix", [".idx", ".bin"])
def test_a_missing_half_is_named(good, reader, suffix):
    good.with_suffix(suffix).unlink()
    with pytest.raises(DatasetIntegrityError, match=rf"ok\{suffix}: no such file; the dataset .*ok "
                                                    rf"needs .*ok\.bin and .*ok\.idx"):
        reader(good)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("size, empty", [(20, ""), (0, r" \(empty\)")])
def test_a_short_index_is_named_with_sizes(good, reader, size, empty):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:size])
    with pytest.raises(DatasetIntegrityError, match=rf"ok\.idx: {size} bytes{empty}, shorter than the "
                                                    r"34-byte header"):
        reader(good)


@pytest.mark.parametrize("reader", READERS)
def test_an_empty_bin_under_an_index_with_tokens_is_named(good, reader):
    good.with_suffix(".bin").write_bytes(b"")
    message = r"ok\.bin: 0 bytes \(the file is empty\), but .*ok\.idx describes 108 uint16 tokens"
    with pytest.raises(DatasetIntegrityError, match=message + " = 216 bytes"):
        reader(good)


def test_good_datasets_still_open(good, megatron_world):
    assert len(open_indexed_dataset(str(good))) == 3
    assert read_all_documents(good)[1] == [4, 5, 0]
    training_check(good)
