"""Megatron checkpoint -> HF directory (megatron_mesh/hf/export.py): the standard Hugging Face
call on every export, and files everyone the umask allows can read."""

import json
import os
import shutil
import stat

import pytest
import torch

from reference import hf_config

PROMPT = "The for statement"
SECTION = dict(hidden_size=64, num_attention_heads=4, vocab_size=512, max_sequence_length=64)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """The demo's kind of tokenizer: a BPE saved as a Hugging Face directory, and its tokenizer.json
    alone as a file (how GPT-NeoX-20B's 20B_tokenizer.json is given)."""
    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("tokenizers")
    directory = train_bpe_tokenizer(pydoc_topics()[:20], 400, tmp / "hf")
    shutil.copy(f"{directory}/tokenizer.json", tmp / "bpe_tokenizer.json")
    return {"hf directory": directory, "tokenizer.json file": str(tmp / "bpe_tokenizer.json")}


def checkpoint(out, tokenizer, layout, scheme):
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    config = MeshConfig.from_section(dict(SECTION, layout=layout, state_scheme=scheme))
    return save_release_checkpoint(build_model(config, {}, ("",)).eval(), checkpoint_args(config, tokenizer), out)


def standard_call(directory):
    """What every model card shows, as a new user types it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    inputs = tok(PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    return type(model).__name__, inputs["input_ids"], out


@pytest.mark.parametrize("form", ["hf directory", "tokenizer.json file"])
@pytest.mark.parametrize("layout, scheme, cls", [("1+2R2+1", "mesh", "MegatronMeshForCausalLM"),
                                                 ("3", "vanilla", "GPTNeoXForCausalLM")])
def test_generate_on_the_standard_tokenizer_call(tmp_path, bpe, megatron_world, form, layout, scheme, cls):
    """Before: ValueError: The following `model_kwargs` are not used by the model: ['token_type_ids']."""
    from megatron_mesh.hf.export import export

    out = export(str(checkpoint(tmp_path / "ckpt", bpe[form], layout, scheme)), str(tmp_path / "hf"))
    name, prompt, generated = standard_call(out)
    assert name == cls and generated.shape == (1, prompt.shape[1] + 4)
    assert torch.equal(generated[:, :prompt.shape[1]], prompt)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]


@pytest.mark.parametrize("given", [False, True])
def test_a_pythia_model_converted_and_exported_takes_the_standard_call(tmp_path, bpe, megatron_world, given):
    """hf-to-megatron of a GPT-NeoX directory, then megatron-to-hf. Its tokenizer beside the
    weights (config.json and tokenizer.json, no tokenizer_config.json: AutoTokenizer's
    GPTNeoXTokenizerFast worked before), or given as a tokenizer.json file (failed in generate)."""
    from transformers import GPTNeoXForCausalLM

    from megatron_mesh.hf.export import export
    from megatron_mesh.hf.importer import hf_to_megatron

    torch.manual_seed(0)
    GPTNeoXForCausalLM(hf_config(64, 4, 512, num_layers=2)).save_pretrained(tmp_path / "pythia")
    if not given:
        shutil.copy(bpe["tokenizer.json file"], tmp_path / "pythia" / "tokenizer.json")
    ckpt = hf_to_megatron(tmp_path / "pythia", tmp_path / "ckpt",
                          tokenizer=bpe["tokenizer.json file"] if given else None)
    out = export(str(ckpt), str(tmp_path / "hf"))
    assert standard_call(out)[0] == "GPTNeoXForCausalLM"


def test_a_missing_tokenizer_is_named_before_the_checkpoint_is_read(tmp_path, bpe, megatron_world):
    from megatron_mesh.data.tokenizer import TokenizerSpecError
    from megatron_mesh.hf.export import export

    gone = tmp_path / "gone" / "bpe_tokenizer.json"
    with pytest.raises(TokenizerSpecError, match=rf"--tokenizer='{gone}': no such file or directory"):
        export(str(tmp_path / "no-checkpoint"), str(tmp_path / "hf"), tokenizer=str(gone))
    gone.parent.mkdir()
    shutil.copy(bpe["tokenizer.json file"], gone)
    ckpt = checkpoint(tmp_path / "ckpt", str(gone), "1+2R2+1", "mesh")
    gone.unlink()  # trained elsewhere: the checkpoint names a file this machine lacks
    with pytest.raises(TokenizerSpecError, match=rf"ckpt: the checkpoint's tokenizer.model='{gone}': no such file "
                                                 r"or directory; .*; pass --tokenizer to export with one found here"):
        export(str(ckpt), str(tmp_path / "hf"))
    assert standard_call(export(str(ckpt), str(tmp_path / "hf"), tokenizer=bpe["hf directory"]))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_export_file_is_readable_as_the_umask_allows(tmp_path, bpe, megatron_world, umask):
    """model.safetensors was written 0600 (safetensors >= 0.8 renames a NamedTempFile into place)
    while config.json and the rest were 0644."""
    from megatron_mesh.hf.export import export

    ckpt = checkpoint(tmp_path / "ckpt", bpe["hf directory"], "1+2R2+1", "mesh")
    old = os.umask(umask)
    try:
        out = export(str(ckpt), str(tmp_path / "hf"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
