"""The Hugging Face model code equals the megatron model, and its KV cache equals no cache."""


import pytest
import torch

from conftest import random_batch, tiny_config
from registry import ANY_DEPTH, LOOPED, PER_STEP, SUMS


def megatron_and_hf(cfg):
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.mapping import hf_mesh_config_kwargs, megatron_to_hf_mesh
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    ours = MeshGPTModel(cfg).eval()
    with torch.no_grad():
        for p in ours.decoder.scheme.parameters() if ours.decoder.scheme else []:
            p.normal_(0.0, 0.5)
    hf = MegatronMeshForCausalLM(MegatronMeshConfig(**hf_mesh_config_kwargs(cfg))).eval()
    missing, unexpected = hf.load_state_dict(megatron_to_hf_mesh(ours.state_dict(), cfg), strict=True)
    assert not missing and not unexpected
    return ours, hf


def test_the_twin_knows_exactly_the_registered_schemes():
    """Its one table of schemes (it cannot import the registry: exports run without
    megatron_mesh) names every registered looped scheme and no other."""
    from megatron_mesh.hf.modeling_megatron_mesh import SCHEMES

    assert set(SCHEMES) == set(LOOPED)


@pytest.mark.parametrize("layout", ["1+2R2+1", "1+1+2+1"])
@pytest.mark.parametrize("scheme", LOOPED + SUMS)
def test_hf_logits_equal_megatron(megatron_world, scheme, layout):
    ours, hf = megatron_and_hf(tiny_config(layout, scheme))
    tokens, positions = random_batch(ours.config, seq=20)
    with torch.no_grad():
        diff = (ours(tokens, positions) - hf(tokens, use_cache=False).logits).abs().max().item()
    assert diff < 1e-4, diff


LLAMA = dict(layer_family="llama", num_query_groups=2, qk_layernorm=True, add_qkv_bias=True,
             rope_scaling_factor=8.0, tie_embeddings=True, ffn_hidden_size=96, max_sequence_length=64)
"""Every llama-family option at once (a plain transformers Llama has no q/k norm: the twin)."""


@pytest.mark.parametrize("layout, scheme", [("3", "vanilla")] + [("1+2R2+1", name) for name in LOOPED])
def test_llama_family_hf_logits_equal_megatron(megatron_world, layout, scheme):
    """The export of a llama-family model (hf/export.py build_hf_model) computes what megatron
    does, norms and q/k/v biases random so that their mapping is tested too."""
    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM
    from megatron_mesh.model.gpt import MeshGPTModel

    cfg = tiny_config(layout, scheme, **LLAMA)
    torch.manual_seed(0)
    ours = MeshGPTModel(cfg).eval()
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "norm" in name or name.endswith("bias") or "scheme" in name:
                param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    hf = build_hf_model({k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}, cfg)
    assert type(hf) is MegatronMeshForCausalLM and hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    tokens, positions = random_batch(cfg, seq=64)
    with torch.no_grad():
        diff = (ours(tokens, positions) - hf.eval()(tokens, use_cache=False).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_vanilla_and_fewer_loops(megatron_world):
    ours, hf = megatron_and_hf(tiny_config("3", "vanilla"))
    tokens, positions = random_batch(ours.config)
    with torch.no_grad():
        assert (ours(tokens, positions) - hf(tokens).logits).abs().max() < 1e-4
    ours, hf = megatron_and_hf(tiny_config("1+2R3+1", "anchor"))
    with torch.no_grad():
        assert (ours(tokens, positions, num_loops=1) - hf(tokens, num_loops=1).logits).abs().max() < 1e-4
    hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == 1 + 1 + 1 + 3 + 1  # h_emb, prelude, h(0), h(1..3), coda


@pytest.mark.parametrize("scheme", ANY_DEPTH)
def test_any_loop_count_beyond_the_training_depth(megatron_world, scheme):
    """Schemes without per-step parameters run more loop steps than trained, HF as Megatron,
    as a forward argument or the exported config's num_loops."""
    from megatron_mesh.hf.modeling_megatron_mesh import MegatronMeshForCausalLM

    ours, hf = megatron_and_hf(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(ours.config)
    with torch.no_grad():
        deeper = ours(tokens, positions, num_loops=5)
        assert (deeper - hf(tokens, num_loops=5).logits).abs().max() < 1e-4
        assert (deeper - ours(tokens, positions)).abs().max() > 1e-3  # the depth matters
        hf.config.num_loops = 5
        again = MegatronMeshForCausalLM(hf.config).eval()
        again.load_state_dict(hf.state_dict())
        assert (deeper - again(tokens).logits).abs().max() < 1e-4


@pytest.mark.parametrize("scheme", PER_STEP)
def test_per_step_schemes_refuse_a_deeper_loop_as_megatron_does(megatron_world, scheme):
    """Their step-t parameters exist for t < K only: both refuse K + 1 steps by name (the twin
    would otherwise index past its parameters, or run a model that was never trained)."""
    ours, hf = megatron_and_hf(tiny_config("1+2R2+1", scheme))
    tokens, positions = random_batch(ours.config)
    with torch.no_grad():
        with pytest.raises(ValueError, match="num_loops=3"):
            ours(tokens, positions, num_loops=3)
        with pytest.raises(ValueError, match="num_loops=3"):
            hf(tokens, num_loops=3)


@pytest.mark.parametrize("scheme, loops", [(name, None) for name in LOOPED]
                         + [(name, 5) for name in ANY_DEPTH])
def test_cached_greedy_generation_equals_full_forward_argmax(megatron_world, scheme, loops):
    """Also with num_loops past the training depth passed to generate (more cache slots)."""
    _, hf = megatron_and_hf(tiny_config("1+2R2+1", scheme))
    prompt = torch.tensor([[5, 17, 42, 8, 9]])
    generated = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True,
                            pad_token_id=0, eos_token_id=None, num_loops=loops)
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            logits = hf(tokens, use_cache=False, num_loops=loops).logits
            next_token = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert generated.tolist() == tokens.tolist()


def test_saved_directory_loads_with_auto_classes_offline(megatron_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, hf = megatron_and_hf(tiny_config("1+2R2+1", "mesh"))
    hf.config.register_for_auto_class()
    hf.register_for_auto_class("AutoModelForCausalLM")
    hf.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "modeling_megatron_mesh.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    tokens, positions = random_batch(ours.config)
    with torch.no_grad():
        assert (loaded(tokens).logits - ours(tokens, positions)).abs().max() < 1e-4
