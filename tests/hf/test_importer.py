"""HF directory -> Megatron release checkpoint (megatron_mesh.hf.importer), and back."""

import json
import math

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from conftest import random_batch, tiny_config
from reference import hf_config


def random_pythia(tmp_path, layers=2, hidden=64, heads=4, vocab=96, seed=1):
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(hf_config(hidden, heads, vocab, num_layers=layers)).eval()
    hf.config.max_position_embeddings = 64
    hf.save_pretrained(tmp_path / "pythia")
    return hf, tmp_path / "pythia"


def weights(hf):
    return {k: v for k, v in hf.state_dict().items() if "rotary" not in k and "masked_bias" not in k}


def test_pythia_to_megatron_and_back_is_bit_identical(tmp_path, megatron_world):
    from megatron_mesh.checkpoint.reader import check_shapes, load_checkpoint, saved_model_config
    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.hf.importer import hf_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    hf, source = random_pythia(tmp_path)
    out = hf_to_megatron(source, tmp_path / "ckpt")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert "state_scheme: vanilla" in (out / "model.yml").read_text()

    state, common = load_checkpoint(str(out))
    config = saved_model_config(common["args"])
    assert (str(config.parsed_layout), config.scale_embeddings) == ("2", False)
    from megatron_mesh.config.yaml_file import load_model_config  # model.yml: train with it
    assert load_model_config(out / "model.yml").model_section() == config.model_section()
    check_shapes(state, config)
    back = weights(build_hf_model(state, config))
    original = weights(hf)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    ours = MeshGPTModel(config).eval()
    ours.load_state_dict(state, strict=False)
    tokens, positions = random_batch(config, seq=24)
    with torch.no_grad():
        assert (ours(tokens, positions) - hf(tokens).logits).abs().max() < 1e-4


@pytest.mark.parametrize("gates", [False, True], ids=["mesh", "mesh-exit-gates"])
def test_mesh_export_converts_back_to_the_same_tensors(tmp_path, megatron_world, gates):
    from megatron_mesh.checkpoint.reader import load_checkpoint
    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.hf.importer import hf_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    config = tiny_config("1+2R2+1", "mesh", exit_gate=gates)
    torch.manual_seed(3)
    original = {k: v for k, v in MeshGPTModel(config).state_dict().items() if not k.endswith("_extra_state")}
    build_hf_model(original, config).save_pretrained(tmp_path / "hf")
    state, common = load_checkpoint(str(hf_to_megatron(tmp_path / "hf", tmp_path / "ckpt")))
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert json.loads(common["args"].mesh_model)["buffer_slots"] == config.buffer_slots


def vanilla_state(layers):
    """Layer i's every tensor filled with i, so each rule's choice is readable from the values."""
    from megatron_mesh.model.gpt import MeshGPTModel

    model = MeshGPTModel(tiny_config(str(layers), "vanilla"))
    return {k: torch.full_like(v, float(k.split(".")[2])) if k.startswith("decoder.prelude.") else v
            for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("rule, core_layers", [
    ("average", [(1 + 3) / 2, (2 + 4) / 2]),  # layers P + k*C + j, k = 0, 1
    ("lower", [1, 2]),                         # layers P + j
    ("stepwise", [1, 3]),                      # layers P + j*K
])
def test_core_init_rules(megatron_world, rule, core_layers):
    from megatron_mesh.hf.importer import recursive_from_vanilla
    from megatron_mesh.recurrence.layout import parse_layout

    state = recursive_from_vanilla(vanilla_state(6), parse_layout("6"), parse_layout("1+2R2+1"), rule)
    qkv = "self_attention.linear_qkv.weight"
    assert state[f"decoder.prelude.0.{qkv}"].unique().tolist() == [0.0]
    assert [state[f"decoder.cores.0.{j}.{qkv}"].unique().item() for j in range(2)] == core_layers
    assert state[f"decoder.coda.0.{qkv}"].unique().tolist() == [5.0]
    assert not any(k.startswith("decoder.prelude.1.") for k in state)


def test_untied_layout_takes_every_layer(megatron_world):
    from megatron_mesh.hf.importer import recursive_from_vanilla
    from megatron_mesh.recurrence.layout import parse_layout

    state = recursive_from_vanilla(vanilla_state(6), parse_layout("6"), parse_layout("1+2+2+1"))
    values = [state[f"decoder.cores.{c}.{j}.mlp.linear_fc1.bias"].unique().item()
              for c in range(2) for j in range(2)]
    assert values == [1, 2, 3, 4]


def test_recursive_init_keeps_the_function_of_the_shared_layers(tmp_path, megatron_world):
    """A 'base' model seeded with lower-rule layers equals the vanilla model whose middle layers
    repeat: the conversion maps weights, the recursion applies them."""
    from megatron_mesh.checkpoint.reader import load_checkpoint, saved_model_config
    from megatron_mesh.hf.importer import hf_to_megatron
    from megatron_mesh.model.gpt import MeshGPTModel

    hf, source = random_pythia(tmp_path, layers=6)
    for j in range(2):  # make layers 3, 4 copies of 1, 2: the 6-layer model is then 1+2R2+1 base
        hf.gpt_neox.layers[3 + j].load_state_dict(hf.gpt_neox.layers[1 + j].state_dict())
    hf.save_pretrained(source)
    out = hf_to_megatron(source, tmp_path / "ckpt", layout="1+2R2+1", state_scheme="base",
                         core_init="lower", scale_embeddings=True)
    state, common = load_checkpoint(str(out))
    config = saved_model_config(common["args"])
    assert config.scale_embeddings and config.state_scheme == "base"
    ours = MeshGPTModel(config).eval()
    ours.load_state_dict(state, strict=False)
    tokens, positions = random_batch(config, seq=24)
    with torch.no_grad():
        assert (ours(tokens, positions) - hf(tokens).logits).abs().max() < 1e-4
    table = hf.gpt_neox.embed_in.weight
    assert torch.allclose(state["embedding.word_embeddings.weight"] * math.sqrt(64), table)


def test_errors(tmp_path, megatron_world):
    from megatron_mesh.fs import OutputExistsError
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.importer import hf_to_megatron

    with pytest.raises(CheckpointError, match="no config.json"):
        hf_to_megatron(tmp_path, tmp_path / "out")
    hf, source = random_pythia(tmp_path)
    with pytest.raises(CheckpointError, match="N_compute 6 differs from the source model's 2 layers"):
        hf_to_megatron(source, tmp_path / "out", layout="1+2R2+1")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    with pytest.raises(OutputExistsError):
        hf_to_megatron(source, busy)
    assert [p.name for p in busy.iterdir()] == ["keep"]

    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="weights shape .*the config implies"):
        hf_to_megatron(source, tmp_path / "out")
    (source / "config.json").write_text(json.dumps({**config, "use_parallel_residual": False}))
    with pytest.raises(CheckpointError, match="use_parallel_residual=False"):
        hf_to_megatron(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))

    (source / "config.json").write_text(json.dumps(config)[:-5])  # cut short
    with pytest.raises(CheckpointError, match=r"pythia/config.json: not valid JSON"):
        hf_to_megatron(source, tmp_path / "out")
    (source / "config.json").write_text(json.dumps(config))
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"pythia/model.safetensors: unreadable, truncated"):
        hf_to_megatron(source, tmp_path / "out")


@pytest.mark.parametrize("drop, change, message", [
    ("hidden_size", {}, "no 'hidden_size': a gpt_neox model needs it (expected int)"),
    ("num_hidden_layers", {}, "no 'num_hidden_layers': a gpt_neox model needs it (expected int)"),
    (None, {"intermediate_size": "256"}, "intermediate_size='256': expected int, got str"),
])
def test_a_config_json_without_a_needed_key_is_named(tmp_path, megatron_world, drop, change, message):
    """A config.json without hidden_size ended in a bare KeyError('hidden_size')."""
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.importer import hf_to_megatron

    _, source = random_pythia(tmp_path)
    config = {k: v for k, v in json.loads((source / "config.json").read_text()).items() if k != drop}
    (source / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as err:
        hf_to_megatron(source, tmp_path / "out")
    assert str(err.value) == f"{source / 'config.json'}: {message}"


def test_a_megatron_mesh_config_json_without_newer_keys_takes_their_defaults(tmp_path):
    """An export from before a field existed lacks its HF name: the MeshConfig default applies;
    one without what no default replaces (the layout) is named."""
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.configuration_megatron_mesh import MegatronMeshConfig
    from megatron_mesh.hf.importer import hf_model_config
    from megatron_mesh.hf.mapping import hf_mesh_config_kwargs

    exported = MegatronMeshConfig(**hf_mesh_config_kwargs(tiny_config(kv_channels=8))).to_dict()
    older = {k: v for k, v in exported.items() if k not in ("kv_channels", "initial_state_std")}
    config = hf_model_config(tmp_path, older)
    assert config.kv_channels == 64 // 4 and config.buffer_slots == 5
    assert config.initial_state_std == MeshConfig.__dataclass_fields__["initial_state_std"].default
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'config.json'}: layout is required"):
        hf_model_config(tmp_path, {k: v for k, v in exported.items() if k != "layout"})
