"""HF Llama / Qwen2 -> Megatron release checkpoint -> HF: the same model, and a plain one."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import random_batch

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
"""A tiny Llama: GQA (4 query heads, 2 K/V groups), SwiGLU, RMSNorm."""

MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=True)),
    # Llama-3 rope scaling (its factors fixed at Llama-3's, as megatron-core's); at base 10000 it
    # slows the lowest frequencies of a 16-wide head tenfold, seen within 64 positions
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "qwen2-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True,
                                                       use_sliding_window=False)),
}


def random_model(name, tmp_path, seed=0):
    torch.manual_seed(seed)
    hf = MODELS[name]().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: random ones test their mapping
        for key, param in hf.named_parameters():
            if "norm" in key or key.endswith("bias"):
                param.normal_(1.0 if "norm" in key else 0.0, 0.1)
    hf.save_pretrained(tmp_path / name)
    return hf, tmp_path / name


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_to_megatron_and_back_is_the_same_model(tmp_path, megatron_world, name):
    from megatron_mesh.checkpoint.reader import check_shapes, load_checkpoint, saved_model_config
    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.hf.importer import hf_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    hf, source = random_model(name, tmp_path)
    out = hf_to_megatron(source, tmp_path / "ckpt")
    state, common = load_checkpoint(str(out))
    config = saved_model_config(common["args"])
    assert (config.layer_family, config.num_query_groups) == ("llama", 2)
    check_shapes(state, config)

    ours = MeshGPTModel(config).eval()
    ours.load_state_dict(state, strict=False)
    tokens, positions = random_batch(config, seq=64)
    with torch.no_grad():
        megatron_logits = ours(tokens, positions)
    assert (megatron_logits - logits(hf, tokens)).abs().max() < 1e-5

    back = build_hf_model(state, config)
    assert type(back) is type(hf)  # a plain transformers model, no remote code
    original = hf.state_dict()
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], original[k]) for k in original)
    assert (logits(back, tokens) - logits(hf, tokens)).abs().max() < 1e-5


def test_rope_scaling_and_base_are_seen_by_the_comparison(tmp_path, megatron_world):
    """The comparison above is sensitive to both: another scaling or base moves the logits
    past its tolerance."""
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.hf.importer import megatron_state_from_hf, model_section_from_hf, read_hf_directory
    from megatron_mesh.model.gpt import MeshGPTModel

    hf, source = random_model("llama3-rope", tmp_path)
    hf_config, hf_state = read_hf_directory(source)
    section = model_section_from_hf(hf_config)
    assert section["rope_scaling_factor"] == 32.0
    tokens = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64).expand(2, 64)
    for change in (dict(rope_scaling_factor=None), dict(rotary_base=500000.0)):
        config = MeshConfig.from_section({**section, **change}, use_cpu_initialization=True)
        ours = MeshGPTModel(config).eval()
        ours.load_state_dict(megatron_state_from_hf(hf_config, hf_state, config), strict=False)
        with torch.no_grad():
            # > 5x the tolerance of the comparison (small weights make small logits)
            assert (ours(tokens, positions) - logits(hf, tokens)).abs().max() > 5e-5, change


def test_export_writes_a_plain_llama_directory(tmp_path, megatron_world, monkeypatch):
    """megatron-to-hf of a vanilla llama checkpoint: a LlamaForCausalLM directory, loaded
    without trust_remote_code, computing what the checkpoint's model computes."""
    from megatron_mesh.hf.export import export
    from megatron_mesh.hf.importer import hf_to_megatron

    hf, source = random_model("llama", tmp_path)
    ckpt = hf_to_megatron(source, tmp_path / "ckpt")
    export(str(ckpt), str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(back) is LlamaForCausalLM and back.config.model_type == "llama"
    assert not list((tmp_path / "hf").glob("*.py"))  # no remote code beside it
    tokens = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    assert (logits(back, tokens) - logits(hf, tokens)).abs().max() < 1e-5


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act='gelu': megatron-mesh supports 'silu'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_an_unsupported_llama_config_is_named(tmp_path, change, message):
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.importer import model_section_from_hf

    config = LlamaConfig(**SHAPE, **change).to_dict()  # as the installed transformers writes it
    with pytest.raises(CheckpointError, match=message):
        model_section_from_hf(config)
