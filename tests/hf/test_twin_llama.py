"""The twin's llama layer family equals transformers' own Llama, Qwen2 and Qwen3 with the same
weights (logits, padded batches, cached greedy generation), and its recursive models run every
registered scheme, save, load and generate; a tied output layer stays tied."""

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
from megatron_mesh.hf.modeling_megatron_mesh import SCHEMES, MegatronMeshForCausalLM, RMSNorm

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
EPS = 1e-6
LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def twin_config(layout="4", scheme="vanilla", **overrides):
    return MegatronMeshConfig(**{**TINY, "layout": layout, "state_scheme": scheme, "layer_family": "llama",
                                 "scale_embeddings": False, "rotary_pct": 1.0, "rotary_emb_base": 10000.0,
                                 "layer_norm_eps": EPS, **overrides})


def rope(base, factor):
    """The rotary settings as the installed transformers spells them (5.x: rope_parameters)."""
    scaling = {**LLAMA3, "factor": factor} if factor else {"rope_type": "default"}
    if TRANSFORMERS_5:
        return {"rope_parameters": {**scaling, "rope_theta": base}}
    return {"rope_theta": base, "rope_scaling": scaling if factor else None}


def reference(config_class, model_class, *, base=10000.0, factor=None, tied=False, **extra):
    """A transformers model of 4 layers with random weights far from their init (norm weights
    1 +- 0.2), so a misplaced norm, rotary or bias shows in the logits."""
    config = config_class(**TINY, num_hidden_layers=4, hidden_act="silu", rms_norm_eps=EPS,
                          max_position_embeddings=16384, tie_word_embeddings=tied, **rope(base, factor), **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def twin_names(state):
    """An HF Llama-like state dict in the twin's names (its vanilla layout's layers are the prelude)."""
    renames = [("model.layers.", "model.prelude."), ("model.embed_tokens.", "model.embed_in."),
               ("model.norm.", "model.final_layer_norm."), ("lm_head.", "embed_out.")]
    out = {}
    for name, value in state.items():
        for theirs, ours in renames:
            if name.startswith(theirs):
                name = ours + name[len(theirs):]
        out[name] = value
    return out


def twin_of(hf, config):
    twin = MegatronMeshForCausalLM(config).eval()
    missing, unexpected = twin.load_state_dict(twin_names(hf.state_dict()), strict=True)
    assert not missing and not unexpected
    return twin


def logits(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, use_cache=False, **kwargs).logits


def padded_batch():
    """Two rows, the second left-padded by 3, and their positions counted from the first real token."""
    tokens = torch.randint(1, TINY["vocab_size"], (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    return tokens, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def greedy(model, prompt, mask=None, new=10):
    return model.generate(prompt, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=True,
                          pad_token_id=0, eos_token_id=None)


def assert_twins(hf, twin, first_position=0):
    """Equal logits (unpadded from ``first_position``, and padded: on the real tokens), equal
    cached greedy generation of one prompt and of a left-padded batch."""
    tokens, mask, positions = padded_batch()
    unpadded = torch.arange(14).expand(2, 14) + first_position
    for m, pos in [(torch.ones_like(mask), unpadded), (mask, positions)]:
        theirs = logits(hf, tokens, attention_mask=m, position_ids=pos)
        ours = logits(twin, tokens, attention_mask=m, position_ids=pos)
        diff = (theirs - ours)[m.bool()].abs().max().item()
        assert diff < 1e-5, diff
    prompt = tokens[:1, :5]
    assert greedy(twin, prompt).tolist() == greedy(hf, prompt).tolist()
    assert greedy(twin, tokens[:, :8], mask[:, :8]).tolist() == greedy(hf, tokens[:, :8], mask[:, :8]).tolist()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("factor", [None, 8.0])
def test_vanilla_llama_twin_equals_transformers_llama(tied, factor):
    hf = reference(LlamaConfig, LlamaForCausalLM, factor=factor, tied=tied)
    twin = twin_of(hf, twin_config(rope_scaling_factor=factor, tie_word_embeddings=tied))
    assert (twin.embed_out.weight is twin.model.embed_in.weight) == tied
    assert_twins(hf, twin, first_position=5000)


def test_rope_scaling_changes_the_logits_at_long_positions():
    """The scaled comparison above is not vacuous: with wavelengths past 2048 (head_dim 16, base
    10000) and positions near 5000, the llama3 scaling moves the logits."""
    hf = reference(LlamaConfig, LlamaForCausalLM, factor=8.0)
    scaled, plain = twin_of(hf, twin_config(rope_scaling_factor=8.0)), twin_of(hf, twin_config())
    tokens, _, _ = padded_batch()
    positions = torch.arange(14).expand(2, 14) + 5000
    diff = (logits(scaled, tokens, position_ids=positions) - logits(plain, tokens, position_ids=positions))
    assert diff.abs().max() > 1e-2


def test_kv_channels_other_than_hidden_over_heads():
    hf = reference(LlamaConfig, LlamaForCausalLM, head_dim=24)
    twin = twin_of(hf, twin_config(kv_channels=24))
    assert twin.model.prelude[0].self_attn.q_proj.weight.shape == (4 * 24, 64)
    assert_twins(hf, twin)


def test_qkv_bias_twin_equals_transformers_qwen2():
    hf = reference(Qwen2Config, Qwen2ForCausalLM, base=1000000.0)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None and hf.model.layers[0].self_attn.o_proj.bias is None
    twin = twin_of(hf, twin_config(add_qkv_bias=True, rotary_emb_base=1000000.0))
    assert_twins(hf, twin)


def test_qk_layernorm_twin_equals_transformers_qwen3():
    """Qwen3's q_norm / k_norm are per-head RMSNorms before rotary, megatron-core's order; with
    norm weights far from 1 the order matters (rotary mixes dims i and i + hd/2)."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    hf = reference(qwen3.Qwen3Config, qwen3.Qwen3ForCausalLM, head_dim=16, attention_bias=False)
    twin = twin_of(hf, twin_config(qk_layernorm=True))
    assert_twins(hf, twin)
    without = MegatronMeshForCausalLM(twin_config()).eval()
    norms = ("q_norm.weight", "k_norm.weight")
    without.load_state_dict({k: v for k, v in twin.state_dict().items() if not k.endswith(norms)})
    tokens, _, _ = padded_batch()
    assert (logits(without, tokens) - logits(twin, tokens)).abs().max() > 1e-3  # the norms do something


def test_qk_layernorm_matches_the_formula():
    """Independently of transformers: one attention block written out by hand."""
    config = twin_config("1", qk_layernorm=True, add_qkv_bias=True, rotary_pct=0.5)
    torch.manual_seed(0)
    model = MegatronMeshForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    attn = model.model.prelude[0].self_attn
    x = torch.randn(2, 7, 64)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * w

    def rotary(t, pos):  # first 8 of 16 dims rotated, pairs (i, i + 4)
        inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
        ang = pos[:, None].float() * inv  # [s, 4]
        a, b, rest = t[..., :4], t[..., 4:8], t[..., 8:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin(), rest], -1)

    with torch.no_grad():
        q = rms((x @ attn.q_proj.weight.T + attn.q_proj.bias).view(2, 7, 4, 16), attn.q_norm.weight)
        k = rms((x @ attn.k_proj.weight.T + attn.k_proj.bias).view(2, 7, 2, 16), attn.k_norm.weight)
        v = (x @ attn.v_proj.weight.T + attn.v_proj.bias).view(2, 7, 2, 16)
        pos = torch.arange(7)
        q, k = rotary(q.transpose(1, 2), pos), rotary(k.transpose(1, 2), pos)  # [b, heads, s, hd]
        k, v = k[:, [0, 0, 1, 1]], v.transpose(1, 2)[:, [0, 0, 1, 1]]  # query head i reads K/V head i // 2
        scores = (q @ k.transpose(-1, -2)) / 4.0 + torch.full((7, 7), float("-inf")).triu(1)
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 64) @ attn.o_proj.weight.T
        cos, sin = model.model.rotary(pos.expand(2, 7))
        mask = torch.ones(7, 7, dtype=torch.bool).tril()
        got = attn(x, cos, sin, mask, None, 0)
    assert (got - expected).abs().max() < 1e-5


RECURSIVE = dict(qk_layernorm=True, add_qkv_bias=True, rope_scaling_factor=8.0, tie_word_embeddings=True)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_recursive_llama_twin_saves_loads_and_generates(tmp_path, scheme):
    config = twin_config("1+2R2+1", scheme, scale_embeddings=True, **RECURSIVE)
    torch.manual_seed(0)
    model = MegatronMeshForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.model.scheme.parameters():
            p.normal_(0.0, 0.5)
    names = set(model.state_dict())
    assert {"model.cores.0.1.self_attn.q_norm.weight", "model.cores.0.1.self_attn.k_proj.bias",
            "model.cores.0.1.mlp.gate_proj.weight", "model.final_layer_norm.weight"} <= names
    layer_biases = {n.split(".")[-2] for n in names if n.endswith(".bias") and not n.startswith("model.scheme.")}
    assert layer_biases == {"q_proj", "k_proj", "v_proj"}  # add_qkv_bias: no other bias in the layers
    if scheme == "linear_injection":  # its readout is the family's norm: an RMSNorm, weight only
        assert isinstance(model.model.scheme.readout, RMSNorm) and "model.scheme.readout.bias" not in names
    tokens, _, _ = padded_batch()
    before = logits(model, tokens)
    assert before.isfinite().all()
    model.save_pretrained(tmp_path / "export")
    loaded = MegatronMeshForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert loaded.config.layer_family == "llama" and loaded.embed_out.weight is loaded.model.embed_in.weight
    assert torch.equal(logits(loaded, tokens), before)
    prompt = tokens[:1, :5]
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, logits(loaded, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy(loaded, prompt, new=6).tolist() == seq.tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_survive_save_and_load(tmp_path, tied):
    model = MegatronMeshForCausalLM(twin_config("2", tie_word_embeddings=tied)).eval()
    model.save_pretrained(tmp_path / "export")
    loaded = MegatronMeshForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (loaded.embed_out.weight is loaded.model.embed_in.weight) == tied
    assert loaded.config.tie_word_embeddings == tied
    tokens, _, _ = padded_batch()
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_init_weights_sets_rms_norms_to_one():
    model = MegatronMeshForCausalLM(twin_config("1+1R2+1", "linear_injection", qk_layernorm=True))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 3 * 4 + 1 + 1  # per layer input, post-attention, q, k; final; readout
    for norm in norms:
        norm.weight.data.zero_()
    model.apply(model._init_weights)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)


def test_config_refuses_an_unknown_family_and_llama_options_on_gpt_neox():
    with pytest.raises(ValueError, match="layer_family='mamba': expected one of"):
        MegatronMeshConfig(layer_family="mamba")
    with pytest.raises(ValueError, match="qk_layernorm=True needs layer_family='llama'"):
        MegatronMeshConfig(layer_family="gpt_neox", qk_layernorm=True)
    with pytest.raises(ValueError, match="num_key_value_heads=3: expected a divisor"):
        twin_config(num_key_value_heads=3)
    neox, llama = MegatronMeshConfig(), twin_config(rotary_pct=None)
    assert (neox.rotary_pct, neox.hidden_act, llama.rotary_pct, llama.hidden_act) == (0.25, "gelu_pytorch_tanh",
                                                                                      1.0, "silu")
    assert (neox.num_key_value_heads, neox.kv_channels) == (16, 128)
