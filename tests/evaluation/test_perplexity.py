"""Perplexity: the windowed NLL against a plain computation, and a Megatron checkpoint against its
HF export (two independent implementations) on an indexed dataset and on jsonl."""

import json
import math

import pytest
import torch

SECTION = dict(layout="1+2R2+1", state_scheme="mesh", hidden_size=64, num_attention_heads=4,
               vocab_size=512, max_sequence_length=64)
L = 32


def tiny_checkpoint(out, tokenizer=None, train_steps=3, seed=0, **fields):
    """SECTION (with ``fields``) trained a few AdamW steps on random tokens, so it is not at its
    initialisation, and saved as a Megatron release checkpoint."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    config = MeshConfig.from_section(dict(SECTION, **fields))
    model = build_model(config, {}, ("",), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    positions = torch.arange(L).expand(4, L)
    for _ in range(train_steps):
        tokens = torch.randint(0, config.vocab_size, (4, L + 1), generator=g)
        loss = model(tokens[:, :-1], positions, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_release_checkpoint(model.eval(), checkpoint_args(config, tokenizer), out)


def texts(start, count, chars=700):
    from megatron_mesh.corpora.python_docs import pydoc_topics

    return [t[:chars] for t in pydoc_topics()[start:start + count]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{scheme: (checkpoint, HF export)} with a BPE tokenizer, plus the data files."""
    from megatron_mesh.data.indexed import train_bpe_tokenizer, write_indexed_dataset
    from megatron_mesh.data.tokenizer import load_tokenizer
    from megatron_mesh.hf.export import export

    tmp = tmp_path_factory.mktemp("ppl")
    tok = train_bpe_tokenizer(texts(0, 30, None), 512, tmp / "tok")
    out = {}
    for scheme in ("mesh", "anchor"):
        ckpt = tiny_checkpoint(tmp / f"{scheme}-ckpt", tok, state_scheme=scheme)
        out[scheme] = ckpt, export(str(ckpt), str(tmp / f"{scheme}-hf"))
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts(30, 4)))
    encoder = load_tokenizer(tok)
    write_indexed_dataset([encoder.encode(t) + [encoder.eod_id] for t in texts(34, 4)],
                          str(tmp / "docs"), 512)
    return out, {"indexed": str(tmp / "docs"), "jsonl": str(tmp / "docs.jsonl")}


def direct_nll(model, doc):
    """Sum of -log p(doc[i] | doc[:i]) for i = 1..n-1, one plain forward over the whole doc."""
    tokens = torch.tensor([doc[:-1]])
    with torch.no_grad():
        logp = model(tokens, torch.arange(len(doc) - 1)[None]).log_softmax(-1)[0]  # [n-1, V]
    return -sum(logp[i, doc[i + 1]].item() for i in range(len(doc) - 1))


def test_windows_cover_every_token_but_the_first_once():
    from megatron_mesh.evaluation.perplexity import windows

    assert list(windows([7], 4)) == []
    assert list(windows([1, 2, 3, 4, 5], 4)) == [([1, 2, 3, 4], [2, 3, 4, 5])]
    assert list(windows(list(range(10)), 4)) == [([0, 1, 2, 3], [1, 2, 3, 4]),
                                                 ([4, 5, 6, 7], [5, 6, 7, 8]), ([8], [9])]


def test_windowed_nll_equals_a_direct_computation(models):
    from megatron_mesh.evaluation.loading import load_model
    from megatron_mesh.evaluation.perplexity import evaluate, load_scorer

    scorer = load_scorer(models[0]["mesh"][0])
    model = load_model(models[0]["mesh"][0]).model  # a second copy, used plainly
    g = torch.Generator().manual_seed(1)
    short = torch.randint(0, 512, (20,), generator=g).tolist()
    long = torch.randint(0, 512, (2 * L + 11,), generator=g).tolist()

    one = evaluate(scorer, [short], L)
    assert one.tokens == 19 and one.documents == 1
    assert one.nll == pytest.approx(direct_nll(model, short), rel=1e-6)

    # longer than L: windows [0, 32), [32, 64), [64, 74), each conditioned on itself only
    both = evaluate(scorer, [short, long], L, batch_size=2)
    per_window = sum(direct_nll(model, long[s:s + L + 1]) for s in range(0, len(long) - 1, L))
    assert both.tokens == 19 + len(long) - 1 and both.documents == 2
    assert both.nll == pytest.approx(one.nll + per_window, rel=1e-6)
    # not the same as one forward over the whole document (which has more context)
    assert abs(both.nll - one.nll - direct_nll(model, long)) > 1e-3
    record = both.as_dict()
    assert record["perplexity"] == pytest.approx(math.exp(both.nll / both.tokens))
    assert record["bits_per_token"] == pytest.approx(both.nll / both.tokens / math.log(2))


@pytest.mark.parametrize("scheme", ["mesh", "anchor"])
def test_checkpoint_and_hf_export_agree(models, scheme, monkeypatch):
    from megatron_mesh.data.documents import read_documents
    from megatron_mesh.evaluation.perplexity import evaluate, load_scorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scorers = [load_scorer(path) for path in models[0][scheme]]
    assert [s.backend for s in scorers] == ["megatron", "hf"]
    for source in models[1].values():
        # jsonl is tokenized with what each model names: the checkpoint's args, the export's files
        megatron, hf = (evaluate(s, read_documents(source, s.tokenizer), L, batch_size=3,
                                 source=source) for s in scorers)
        assert megatron.documents == hf.documents == 4
        assert megatron.tokens == hf.tokens > 4 * L
    assert abs(megatron.mean_nll - hf.mean_nll) / megatron.mean_nll < 1e-4
    assert 1 < math.exp(megatron.mean_nll) < 2 * 512  # near uniform after a few random-token steps


def test_bad_input(models):
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.evaluation.perplexity import check_seq_length, evaluate, load_scorer

    with pytest.raises(CheckpointError, match="nowhere: no such model directory"):
        load_scorer("nowhere")
    with pytest.raises(ValueError, match="--seq-length 65: model m takes 1..64"):
        check_seq_length(65, 64, "m")
    scorer = load_scorer(models[0]["mesh"][0])
    with pytest.raises(ValueError, match="d.jsonl: token id 600 >= the model's vocabulary size 512"):
        evaluate(scorer, [[1, 2, 600]], L, source="d.jsonl")
    with pytest.raises(ValueError, match="no document with at least 2 tokens"):
        evaluate(scorer, [[5]], L)
