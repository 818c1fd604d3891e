"""tools/convert.py megatron-to-hf: a checkpoint written by the trainer, exported and reloaded."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, random_batch, tiny_config
from test_pretrain import ckpt_overrides, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    train(tmp, ckpt_overrides(tmp / "ckpt", **{"training.train_iters": 3}))
    return tmp / "ckpt"


def test_export_loads_offline_and_matches_megatron(checkpoint, tmp_path, monkeypatch, megatron_world):
    from transformers import AutoModelForCausalLM

    from megatron_mesh.hf.export import load_checkpoint, mesh_config_from_args
    from megatron_mesh.model import MeshGPTModel

    out = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "megatron-to-hf", "--load",
                          str(checkpoint), "--output", str(tmp_path / "hf")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "hf" / "README.md").read_text().count("1+2R2+1") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()

    state, common = load_checkpoint(str(checkpoint))
    config = mesh_config_from_args(common["args"])
    ours = MeshGPTModel(config).eval()
    ours.load_state_dict(state, strict=False)
    tokens, positions = random_batch(config, seq=24)
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens, positions)).abs().max() < 1e-4


def test_vanilla_exports_as_plain_gpt_neox(megatron_world):
    from transformers import GPTNeoXForCausalLM

    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.model import MeshGPTModel

    config = tiny_config("3", "vanilla")
    torch.manual_seed(0)
    ours = MeshGPTModel(config).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    hf = build_hf_model(state, config).eval()
    assert type(hf) is GPTNeoXForCausalLM and hf.config.hidden_act == "gelu_pytorch_tanh"
    assert torch.allclose(hf.gpt_neox.embed_in.weight, state["embedding.word_embeddings.weight"] * math.sqrt(64))
    tokens, positions = random_batch(config)
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens, positions)).abs().max() < 1e-4


def test_errors(checkpoint, tmp_path):
    from megatron_mesh.hf.export import CheckpointError, export

    with pytest.raises(CheckpointError, match="not a Megatron checkpoint"):
        export(str(tmp_path), str(tmp_path / "out"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        export(str(checkpoint), str(busy))
    assert (busy / "keep.txt").exists()
    with pytest.raises(CheckpointError, match="no torch_dist checkpoint for iteration 7"):
        export(str(checkpoint), str(tmp_path / "x"), iteration=7)
