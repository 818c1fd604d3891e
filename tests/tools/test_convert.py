"""tools/convert.py megatron-to-hf: a checkpoint written by the trainer, exported and reloaded."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, random_batch, tiny_config
from trainer import ckpt_overrides, command, corrupt_a_weight, env, train

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them


BF16 = {"precision.dtype": "bf16", "parallelism.distributed_optimizer": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bf16 run's checkpoint (the production setting: bf16 weights are what it saves)."""
    tmp = tmp_path_factory.mktemp("convert")
    train(tmp, ckpt_overrides(tmp / "ckpt", **{"training.train_iters": 3, **BF16}))
    return tmp / "ckpt"


def export_cli(checkpoint, out):
    done = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "megatron-to-hf", "--load",
                           str(checkpoint), "--output", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_export_loads_offline_and_matches_megatron(checkpoint, tmp_path, monkeypatch, megatron_world):
    """fp32 export == the Megatron model in fp32 (same bf16-valued weights, 1e-4). The bf16
    export keeps the checkpoint's bf16 weights bit for bit and runs in bf16; its logits are then
    as far from the fp32 logits as bf16 rounding puts the Megatron model itself run in bf16
    (at most twice that distance; a wiring error would be O(1))."""
    from transformers import AutoModelForCausalLM

    from megatron_mesh.checkpoint.reader import load_checkpoint, saved_model_config
    from megatron_mesh.hf.export import export
    from megatron_mesh.hf.mapping import megatron_to_hf_mesh
    from megatron_mesh.model.gpt import MeshGPTModel

    export_cli(checkpoint, tmp_path / "hf")
    export(str(checkpoint), str(tmp_path / "hf16"), dtype="bf16")  # what --dtype bf16 calls
    assert (tmp_path / "hf" / "README.md").read_text().count("1+2R2+1") == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf16", trust_remote_code=True,
                                                dtype="auto").eval()

    state, common = load_checkpoint(str(checkpoint))
    config = saved_model_config(common["args"])
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    for name, tensor in megatron_to_hf_mesh(state, config).items():
        assert hf16.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(hf16.state_dict()[name], tensor), name
    ours = MeshGPTModel(config).eval()
    ours.load_state_dict(state, strict=False)
    tokens, positions = random_batch(config, seq=64)
    with torch.no_grad():
        reference = ours(tokens, positions)
        assert (hf(tokens).logits - reference).abs().max() < 1e-4
        logits16 = hf16(tokens).logits
        ours16 = ours.bfloat16()(tokens, positions)
    assert logits16.dtype == ours16.dtype == torch.bfloat16

    def off(logits):
        return ((logits.float() - reference).abs().max() / reference.abs().max()).item()

    assert 0 < off(ours16) and off(logits16) <= 2 * off(ours16), (off(logits16), off(ours16))


def test_vanilla_exports_as_plain_gpt_neox(megatron_world):
    from transformers import GPTNeoXForCausalLM

    from megatron_mesh.hf.export import build_hf_model
    from megatron_mesh.model.gpt import MeshGPTModel

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


def test_help_prints_only_help():
    """megatron-core's notes on absent kernels (TE, apex) are silenced at the tools' entry."""
    done = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: convert.py")
    assert done.stderr == "", done.stderr


def test_errors(checkpoint, tmp_path):
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.fs import OutputExistsError
    from megatron_mesh.hf.export import export

    with pytest.raises(CheckpointError, match="not a Megatron checkpoint"):
        export(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="nowhere: does not exist"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        export(str(checkpoint), str(busy))
    assert (busy / "keep.txt").exists()
    with pytest.raises(CheckpointError, match="no torch_dist checkpoint for iteration 7"):
        export(str(checkpoint), str(tmp_path / "x"), iteration=7)


def test_a_damaged_checkpoint_is_refused_and_nan_weights_are_not_exported(checkpoint, tmp_path):
    """The issue's repro: 256 bytes overwritten inside a weight of the latest .distcp. The hash
    check names the file; unverified, the NaN weights are refused unless allowed."""
    import shutil

    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.hf.export import export

    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint, damaged)
    data = corrupt_a_weight(damaged / "iter_0000003")
    done = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "megatron-to-hf", "--load",
                           str(damaged), "--output", str(tmp_path / "hf")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and not (tmp_path / "hf").exists()  # cli.USAGE_ERROR
    assert f"error: {damaged / 'iter_0000003'}: damaged checkpoint: {data}: xxh3_128 " in done.stderr
    assert "To load it unverified anyway: pass --no-verify" in done.stderr
    with pytest.raises(CheckpointError, match=r"1 weight tensors hold NaN/Inf: .*linear_fc1.weight "
                                              r"\(128 values\).*--allow-non-finite"):
        export(str(damaged), str(tmp_path / "hf"), verify_hashes=False)
    out = export(str(damaged), str(tmp_path / "hf"), verify_hashes=False, allow_non_finite=True)
    assert (out / "config.json").is_file()


def test_trainer_starts_from_a_converted_pythia_model(tmp_path, megatron_world):
    """hf-to-megatron (CLI) seeds tiny-cpu.yml's 1+2R2+1 mesh model from a 6-layer GPT-NeoX; a
    bf16 run with the distributed optimizer loads it (lr 0: the weights it saves are the
    converted ones, rounded once to bf16) and refuses a config whose model differs."""
    from transformers import GPTNeoXForCausalLM

    from megatron_mesh.checkpoint.reader import load_checkpoint
    from reference import hf_config

    torch.manual_seed(0)
    GPTNeoXForCausalLM(hf_config(64, 4, 4096, num_layers=6)).save_pretrained(tmp_path / "pythia")
    out = subprocess.run([sys.executable, str(REPO / "tools/convert.py"), "hf-to-megatron", "--hf",
                          str(tmp_path / "pythia"), "--output", str(tmp_path / "seed"), "--layout",
                          "1+2R2+1", "--state-scheme", "mesh", "--scale-embeddings"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    run = tmp_path / "run"
    overrides = ckpt_overrides(run, **{"checkpointing.pretrained": tmp_path / "seed",
                                       "training.train_iters": 2, "optimizer.lr": 0.0,
                                       "model.max_sequence_length": 2048, **BF16})
    log, losses = train(tmp_path, overrides)
    assert "release" in log and sorted(losses) == [1, 2]
    seeded, _ = load_checkpoint(str(tmp_path / "seed"))
    trained, _ = load_checkpoint(str(run))
    assert seeded.keys() == trained.keys()
    assert {t.dtype for t in seeded.values()} == {torch.float32}
    assert all(torch.equal(seeded[k].bfloat16(), trained[k]) for k in seeded)

    bad = subprocess.run(command(tmp_path, ckpt_overrides(tmp_path / "other", **{
        "checkpointing.pretrained": tmp_path / "seed", "model.state_scheme": "base",
        "model.max_sequence_length": 2048})), capture_output=True, text=True, cwd=REPO, env=env(),
        timeout=300)
    assert bad.returncode != 0
    assert "state_scheme: checkpoint 'mesh', config 'base'" in bad.stderr + bad.stdout


def test_retrofit_from_the_command_line(tmp_path):
    """hf-to-megatron --retrofit: the layers it took, the ones it dropped and whether one loop
    step is the pruned model, then a checkpoint the trainer's model section describes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    convert = [sys.executable, str(REPO / "tools/convert.py"), "hf-to-megatron", "--hf",
               str(tmp_path / "llama"), "--retrofit", "--layout", "1+2R3+1"]
    done = subprocess.run([*convert, "--output", str(tmp_path / "ckpt")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "retrofit: layers 0,3-4,5 (prelude, core, coda); dropped [1, 2]" in done.stdout
    assert "at one loop step the model computes the source without the dropped layers" in done.stdout
    model_yml = (tmp_path / "ckpt" / "model.yml").read_text()
    assert "layer_family: llama" in model_yml and "state_scheme: additive_injection" in model_yml
    bad = subprocess.run([*convert[:5], "--layers", "0,1-2,3", "--output", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "error: --layers chooses the layers of a --retrofit: add --retrofit")
