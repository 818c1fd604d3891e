"""The Pythia pre-shuffled reader on a synthetic file whose rows carry their own row number."""

import json
import subprocess
import sys

import numpy
import pytest

from conftest import REPO

from megatron_mesh.data.indexed import write_indexed_dataset
from megatron_mesh.data.pythia import ROW_TOKENS, PythiaPreshuffledDataset


def row(r):
    """Row r: [r // 1000, r % 1000, then (r + k) % 997 ...]: its number is in its first tokens."""
    return [r // 1000, r % 1000] + [2 + (r + k) % 997 for k in range(ROW_TOKENS - 2)]


def row_number(tokens):
    return int(tokens[0]) * 1000 + int(tokens[1])


@pytest.fixture(scope="module")
def preshuffled(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("pythia") / "document"
    write_indexed_dataset((row(r) for r in range(2100)), prefix, vocab_size=50304)
    return str(prefix)




def sampler_steps(dataset_len, global_batch, micro_batch, dp_size, dp_rank, consumed=0, steps=3):
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    sampler = MegatronPretrainingSampler(dataset_len, consumed, micro_batch, dp_rank, dp_size)
    per_step = global_batch // (micro_batch * dp_size)  # micro-batches per rank per step
    batches = iter(sampler)
    return [[i for _ in range(per_step) for i in next(batches)] for _ in range(steps)]


@pytest.mark.parametrize("seq", [2048, 4096])
def test_rows_of_each_step_and_sequence(preshuffled, seq):
    ds = PythiaPreshuffledDataset(preshuffled, seq)
    rows_per_sample = seq // 2048
    assert len(ds) == 2100 // rows_per_sample
    G = 8
    for step in range(3):
        for j in range(G):
            item = ds[step * G + j]
            rows = [row_number(item["tokens"][k * 2048 :]) for k in range(rows_per_sample)]
            assert rows == [rows_per_sample * (step * G + j) + k for k in range(rows_per_sample)]
            expected = numpy.concatenate([row(r) for r in rows])
            # per_row: each row's 2048 inputs and its own 2048 shifted labels
            assert item["tokens"].tolist() == [t for r in rows for t in row(r)[:-1]]
            assert item["labels"].tolist() == [t for r in rows for t in row(r)[1:]]
            assert item["loss_mask"].sum() == seq and item["position_ids"].tolist() == list(range(seq))
            assert len(expected) == ROW_TOKENS * rows_per_sample


def test_design_formula_at_global_batch_512(preshuffled):
    ds = PythiaPreshuffledDataset(preshuffled, 4096)
    step, j = 1, 3  # sequence j of step s = rows 1024s + 2j and 1024s + 2j + 1
    assert list(ds.row_numbers(step * 512 + j)) == [1024 * step + 2 * j, 1024 * step + 2 * j + 1]
    assert row_number(ds[step * 512 + j]["tokens"]) == 1030


def test_contiguous_boundaries(preshuffled):
    plain = PythiaPreshuffledDataset(preshuffled, 4096, "contiguous")[5]
    masked = PythiaPreshuffledDataset(preshuffled, 4096, "contiguous_masked")[5]
    stream = row(10) + row(11)
    assert plain["tokens"].tolist() == stream[:4096] and plain["labels"].tolist() == stream[1:4097]
    assert plain["labels"][2048] == row(11)[0]  # the label that crosses rows
    assert plain["loss_mask"].sum() == 4096
    assert masked["loss_mask"][2048] == 0 and masked["loss_mask"].sum() == 4095


@pytest.mark.parametrize("seq", [2048, 4096])
def test_data_parallel_ranks_split_each_global_batch(preshuffled, seq):
    ds = PythiaPreshuffledDataset(preshuffled, seq)
    G, mb = 8, 2
    rank0 = sampler_steps(len(ds), G, mb, 2, 0)
    rank1 = sampler_steps(len(ds), G, mb, 2, 1)
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(step * G, (step + 1) * G))
    single = sampler_steps(len(ds), G, mb, 1, 0)
    assert [sorted(s) for s in single] == [sorted(a + b) for a, b in zip(rank0, rank1)]


def test_resume_starts_at_the_right_rows_without_reading_earlier_ones(preshuffled, monkeypatch):
    ds = PythiaPreshuffledDataset(preshuffled, 4096)
    G, mb, k = 8, 4, 5
    resumed = sampler_steps(len(ds), G, mb, 1, 0, consumed=k * G, steps=2)
    assert resumed == [list(range(k * G, (k + 1) * G)), list(range((k + 1) * G, (k + 2) * G))]
    seen = []
    original = type(ds.rows).__getitem__
    monkeypatch.setattr(type(ds.rows), "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    ds[resumed[0][0]]
    assert seen == [2 * k * G, 2 * k * G + 1]  # only the two rows of that sample


@pytest.mark.slow
def test_batch_viewer_prints_what_the_reader_yields(preshuffled):
    out = subprocess.run([sys.executable, str(REPO / "tools/batch_viewer.py"), "--data", preshuffled,
                          "--seq-length", "4096", "--global-batch-size", "8", "--step", "2",
                          "--sequence", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["rows"] == [34, 35] and record["sample"] == 17
    assert record["tokens"] == PythiaPreshuffledDataset(preshuffled, 4096)[17]["tokens"].tolist()


def test_merge_shards_equals_one_file(tmp_path, preshuffled):
    sys.path.insert(0, str(REPO / "tools"))
    from merge_datasets import merge

    for s, rows in enumerate([range(0, 700), range(700, 2100)]):
        write_indexed_dataset((row(r) for r in rows), tmp_path / f"shard{s}", vocab_size=50304)
    assert merge([str(tmp_path / "shard0"), str(tmp_path / "shard1")], str(tmp_path / "merged")) == 2100
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == open(preshuffled + suffix, "rb").read()
    merged = PythiaPreshuffledDataset(str(tmp_path / "merged"), 2048)
    assert row_number(merged[1500]["tokens"]) == 1500
