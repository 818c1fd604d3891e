"""Every integrity check on a deliberately broken file names the file and the numbers."""

import struct

import pytest

from megatron_mesh.data.indexed import write_indexed_dataset
from megatron_mesh.data.integrity import (DatasetIntegrityError, check_indexed_dataset,
                                          check_token_range, check_tokenizer_vocab)


@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "ok"
    write_indexed_dataset([[1, 2, 3, 0], [4, 5, 0], list(range(100)) + [0]], prefix, vocab_size=50304)
    return prefix


def patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_good_file_passes(good):
    header = check_indexed_dataset(str(good))
    assert (header.sequences, header.documents) == (3, 4)


def test_wrong_magic(good):
    patch(good.with_suffix(".idx"), 0, b"NOTANIDX\x00")
    with pytest.raises(DatasetIntegrityError, match=r"ok.idx: bad magic b'NOTANIDX\\x00', expected"):
        check_indexed_dataset(str(good))


def test_wrong_version(good):
    patch(good.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(DatasetIntegrityError, match="ok.idx: index version 2, expected 1"):
        check_indexed_dataset(str(good))


def test_unknown_dtype(good):
    patch(good.with_suffix(".idx"), 17, struct.pack("<B", 42))
    with pytest.raises(DatasetIntegrityError, match="unknown dtype code 42"):
        check_indexed_dataset(str(good))


def test_bin_length_disagrees_with_index(good):
    binfile = good.with_suffix(".bin")
    binfile.write_bytes(binfile.read_bytes()[:-10])
    with pytest.raises(DatasetIntegrityError,
                       match=r"ok.bin: 206 bytes, but .*ok.idx describes 108 uint16 tokens = 216 bytes"):
        check_indexed_dataset(str(good))


def test_truncated_index(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:40])
    with pytest.raises(DatasetIntegrityError, match="ok.idx: 40 bytes, but 3 sequences"):
        check_indexed_dataset(str(good))


def test_missing_files(tmp_path):
    with pytest.raises(DatasetIntegrityError, match="expected .*nothing.bin and .*nothing.idx"):
        check_indexed_dataset(str(tmp_path / "nothing"))


def test_token_ids_above_the_padded_vocabulary(good):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(good))
    check_token_range(ds, str(good), 100)
    with pytest.raises(DatasetIntegrityError, match="sequence 2 holds token id 99, at or above .* size 64"):
        check_token_range(ds, str(good), 64)


def test_tokenizer_larger_than_the_model_vocabulary():
    check_tokenizer_vocab(50277, 50304, "20B_tokenizer.json")
    with pytest.raises(DatasetIntegrityError, match="has 50277 ids but the model's vocab_size is 4096"):
        check_tokenizer_vocab(50277, 4096, "20B_tokenizer.json")


def test_pythia_rows_must_hold_2049_tokens(tmp_path):
    from megatron_mesh.data.pythia import PythiaPreshuffledDataset

    write_indexed_dataset([[1] * 2049, [1] * 2048, [1] * 2049], tmp_path / "rows", vocab_size=50304)
    with pytest.raises(DatasetIntegrityError, match="row 1 has 2048 tokens; pre-shuffled Pythia rows hold 2049"):
        PythiaPreshuffledDataset(str(tmp_path / "rows"), 2048)
    write_indexed_dataset([[60000] * 2049], tmp_path / "big", vocab_size=65536)
    with pytest.raises(DatasetIntegrityError, match="token id 60000"):
        PythiaPreshuffledDataset(str(tmp_path / "big"), 2048, vocab_size=50304)
    with pytest.raises(ValueError, match="multiple of 2048"):
        PythiaPreshuffledDataset(str(tmp_path / "big"), 3000)


def test_trailing_bytes_and_bad_pointers(good):
    idx = good.with_suffix(".idx")
    original = idx.read_bytes()
    idx.write_bytes(original + b"\x00" * 8)
    with pytest.raises(DatasetIntegrityError, match="ok.idx: .* bytes, but 3 sequences"):
        check_indexed_dataset(str(good))
    idx.write_bytes(original)
    patch(idx, 34 + 3 * 4 + 8, struct.pack("<q", 6))  # sequence 1 should start at byte 8
    with pytest.raises(DatasetIntegrityError, match="sequence 1 starts at byte 6, expected 8"):
        check_indexed_dataset(str(good))
