"""tools/preprocess_data.py: round trip with the GPT-NeoX-20B tokenizer, workers, bad records."""

import gzip
import json
import subprocess
import sys

import pytest

from conftest import REPO, SHARED

NEOX = SHARED / "data" / "20B_tokenizer.json"
needs_neox = pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer not beside the repo")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, über, 日本語, emoji 🙂 and tabs\tand\nnewlines.",
    "def f(x):\n    return x ** 2  # code survives too\n",
    "",
    "A longer document. " * 200,
]


def write_inputs(tmp_path):
    zstandard = pytest.importorskip(  # requirements/cpu.txt has it; the GPU image has not
        "zstandard", reason="zstd-compressed jsonl needs zstandard")

    lines = [json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("".join(lines[:2]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines[2])
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[3].encode()))
    (tmp_path / "d.txt").write_text(DOCS[4])
    return [tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt")]


def decode_all(prefix, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    out = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == 0  # <|endoftext|> after every document
        out.append(tokenizer.decode(ids[:-1]))
    return out, ds


@needs_neox
def test_round_trip_and_worker_count_independence(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from megatron_mesh.data.preprocess import preprocess

    inputs = write_inputs(tmp_path)
    many = [json.dumps({"text": f"document {i}: " + DOCS[i % 3]}) + "\n" for i in range(700)]
    (tmp_path / "many.jsonl").write_text("".join(many))  # > 10 chunks: worker ordering matters
    inputs.append(tmp_path / "many.jsonl")
    one = preprocess(inputs, tmp_path / "w1", str(NEOX), workers=1, progress=False)
    three = preprocess(inputs, tmp_path / "w3", str(NEOX), workers=3, progress=False)
    assert one.documents == three.documents == len(DOCS) + 700 and not one.bad
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w3{suffix}").read_bytes()
    texts, ds = decode_all(tmp_path / "w1", PreTrainedTokenizerFast(tokenizer_file=str(NEOX)))
    assert texts == DOCS + [json.loads(m)["text"] for m in many]
    import numpy

    assert ds.index.dtype == numpy.uint16  # 50277 ids fit


def test_bad_records_are_reported_with_lines_and_strict_fails_without_output(tmp_path):
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.data.preprocess import BadRecordError, preprocess

    tok = train_bpe_tokenizer(DOCS * 5, 300, tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": broken\n{"body": "no text key"}\n'
                    b'{"text": 17}\n{"text": "bad \xff utf8"}\n\n{"text": "also fine"}\n')
    report = preprocess([bad], tmp_path / "out", tok, progress=False)
    assert report.documents == 2
    got = [(b.line, b.reason.split(" ")[0]) for b in report.bad]
    assert got == [(2, "invalid"), (3, "missing"), (4, "key"), (5, "invalid")]
    assert "invalid JSON" in report.bad[0].reason and "invalid UTF-8" in report.bad[3].reason
    assert f"{bad}:3: missing key 'text'" in report.summary()

    with pytest.raises(BadRecordError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess([bad], tmp_path / "strict", tok, strict=True, progress=False)
    assert not list(tmp_path.glob("strict*")), "strict failure left files behind"


@pytest.mark.slow
def test_sentencepiece_model(tmp_path):
    import sentencepiece

    from megatron_mesh.data.preprocess import preprocess

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(DOCS[:3] * 50))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=120, model_type="bpe", eos_id=1, unk_id=0,
                                             bos_id=-1, pad_id=-1, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS[:1]))
    preprocess([docs], tmp_path / "sp_out", str(tmp_path / "sp.model"), json_key="content", progress=False)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "sp_out"))
    ids = ds[0].tolist()
    assert ids[-1] == sp.eos_id() and sp.decode(ids[:-1]) == DOCS[0]


@pytest.mark.slow
def test_cli_reports_and_exits_nonzero_on_missing_input(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input",
                          str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "x"),
                          "--tokenizer", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == f"error: {tmp_path / 'nope.jsonl'}: input file not found\n"


@pytest.mark.slow
def test_no_documents_is_an_error_and_writes_nothing(tmp_path):
    """An empty input (or one of bad records only) would make a 0-document dataset that
    training and evaluation fail on later ("cannot mmap an empty file")."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "tok").mkdir()
    from megatron_mesh.data.indexed import train_bpe_tokenizer

    tok = train_bpe_tokenizer(DOCS * 5, 300, tmp_path / "tok")
    out = subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input",
                          str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "x"),
                          "--tokenizer", tok, "--no-progress"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr  # a user's error (cli.USAGE_ERROR), no traceback
    assert "empty.jsonl: no documents to write (empty input)" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("x*")), "a failed run left a dataset behind"


def test_an_empty_shard_is_written_only_when_asked(tmp_path):
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.data.integrity import read_header
    from megatron_mesh.data.preprocess import preprocess

    (tmp_path / "empty.jsonl").write_text("")
    tok = train_bpe_tokenizer(DOCS * 5, 300, tmp_path / "tok")
    with pytest.raises(ValueError, match="no documents to write"):
        preprocess([tmp_path / "empty.jsonl"], tmp_path / "x", tok, progress=False)
    preprocess([tmp_path / "empty.jsonl"], tmp_path / "x", tok, progress=False, allow_empty=True)
    assert read_header(str(tmp_path / "x")).sequences == 0  # an index of no documents
