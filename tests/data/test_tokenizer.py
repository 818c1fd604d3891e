"""The one tokenizer rule (megatron_mesh/data/tokenizer.py): what names a tokenizer, for every tool."""

import json
import shutil

import pytest

from conftest import SHARED

from megatron_mesh.data.tokenizer import (EXPECTED, TokenizerSpecError, hf_tokenizer, load_tokenizer,
                                          tokenizer_source)

NEOX = SHARED / "data" / "20B_tokenizer.json"
TEXT = "The for statement iterates over the items of any sequence."


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE saved as a Hugging Face directory (tokenizer.json + tokenizer_config.json
    naming PreTrainedTokenizerFast), as tools/demo.py makes one."""
    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer

    return train_bpe_tokenizer(pydoc_topics()[:20], 400, tmp_path_factory.mktemp("bpe") / "hf")


def layouts(bpe, tmp_path):
    """Every form of the rule holding the same tokenizer.json: {form: (spec, kind)}."""
    file = tmp_path / "bpe_tokenizer.json"
    shutil.copy(f"{bpe}/tokenizer.json", file)
    forms = {"file": (str(file), "tokenizer_json"), "hf directory": (bpe, "hf_directory")}
    classless = {"tokenizer_config.json": {"eos_token": "<|endoftext|>"}}
    for name, beside in [("only tokenizer.json", {}), ("with a classless tokenizer_config.json", classless),
                         ("with a model's config.json", {"config.json": {"model_type": "megatron_mesh"}})]:
        folder = tmp_path / name.replace(" ", "_").replace("'", "")
        folder.mkdir()
        shutil.copy(file, folder / "tokenizer.json")
        for config, data in beside.items():
            (folder / config).write_text(json.dumps(data))
        forms[name] = (str(folder), "tokenizer_json")
    return forms


def test_every_form_of_the_rule_gives_the_same_tokenizer(bpe, tmp_path):
    """Before the rule a directory holding only tokenizer.json, or one whose tokenizer_config.json
    names no class, failed in AutoTokenizer ("Unrecognized model")."""
    results = {}
    for form, (spec, kind) in layouts(bpe, tmp_path).items():
        assert tokenizer_source(spec).kind == kind, form
        tok, text = hf_tokenizer(spec), load_tokenizer(spec)
        assert tok.eos_token == "<|endoftext|>" and text.eod_id == tok.eos_token_id == 0, form
        assert list(tok(TEXT)) == ["input_ids", "attention_mask"], form  # no token_type_ids
        results[form] = (tok(TEXT)["input_ids"], text.encode(TEXT), text.vocab_size)
    assert len(set(map(str, results.values()))) == 1, results


@pytest.mark.skipif(not NEOX.is_file(), reason="GPT-NeoX-20B tokenizer not beside the repo")
def test_gpt_neox_20b_tokenizer_json_file():
    tok = hf_tokenizer(str(NEOX))
    assert (len(tok), tok.eos_token_id, tok("The for statement")["input_ids"]) == (50277, 0, [510, 323, 3908])
    assert load_tokenizer(str(NEOX)).encode("The for statement") == [510, 323, 3908]


def test_hub_names_pass_unchecked_and_missing_paths_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("EleutherAI/gpt-neox-20b", "gpt2", "EleutherAI/pythia-1.4b"):
        assert tokenizer_source(name).kind == "hub_name", name
    # a local path: absolute, relative in a folder that exists here, or with more than one '/'
    for missing in ("/data/tokenizers/20B_tokenizer.json", "runs/tok", "a/b/c", "tok.json", "~/tok"):
        with pytest.raises(TokenizerSpecError) as err:
            tokenizer_source(missing, "tokenizer.model")
        assert str(err.value) == (f"tokenizer.model={missing!r}: no such file or directory; "
                                  f"expected {EXPECTED}")


def test_paths_holding_nothing_usable_say_what_was_expected(bpe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerSpecError, match=r"--tokenizer='.*empty': a directory without tokenizer.json "
                                                 r"or a tokenizer_config.json naming its tokenizer_class \(it "
                                                 r"holds nothing\); expected a tokenizer.json file"):
        tokenizer_source(str(empty), "--tokenizer")
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(f"{bpe}/tokenizer.json", shared / "20B_tokenizer.json")  # the shared data folder's layout
    with pytest.raises(TokenizerSpecError, match=rf"holds \['20B_tokenizer.json'\]\); did you mean "
                                                 rf"{shared / '20B_tokenizer.json'}\?"):
        tokenizer_source(str(shared))
    (tmp_path / "notes.txt").write_text("not json")
    with pytest.raises(TokenizerSpecError, match=r"notes.txt: not a tokenizer.json \(invalid JSON"):
        tokenizer_source(str(tmp_path / "notes.txt"))
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    with pytest.raises(TokenizerSpecError, match=r"config.json: a JSON file but not a Hugging Face tokenizers "
                                                 r"file \(no 'model' entry\)"):
        tokenizer_source(str(tmp_path / "config.json"))


def test_a_sentencepiece_model_is_for_preprocessing_not_for_hf(tmp_path):
    model = tmp_path / "sp.model"
    model.write_bytes(b"")
    assert tokenizer_source(str(model)).kind == "sentencepiece"
    with pytest.raises(TokenizerSpecError, match="a SentencePiece model, which a Hugging Face tokenizer"):
        hf_tokenizer(str(model))
