"""tools/probe.py on tiny trained models: a Megatron checkpoint and an HF export, side by side."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

SECTION = dict(hidden_size=64, num_attention_heads=4, vocab_size=128, max_sequence_length=64)
SEQ, SAMPLES = 32, 3
PNG = b"\x89PNG\r\n\x1a\n"


def trained_checkpoint(scheme, out, steps=8):
    """A 1+2R2+1 model trained a few AdamW steps on random tokens, as a release checkpoint."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    config = MeshConfig.from_section(dict(SECTION, layout="1+2R2+1", state_scheme=scheme),
                                     use_cpu_initialization=True)
    model = build_model(config, {}, ("",), seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, SECTION["vocab_size"], (4, SEQ + 1), generator=g)
        positions = torch.arange(SEQ).expand(4, SEQ)
        loss = model(tokens[:, :-1], positions, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_release_checkpoint(model.eval(), checkpoint_args(config, None), out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(base checkpoint, mesh HF export, indexed dataset prefix)."""
    from megatron_mesh.data.indexed import write_indexed_dataset
    from megatron_mesh.hf.export import export

    tmp = tmp_path_factory.mktemp("probe")
    base = trained_checkpoint("base", tmp / "base-ckpt")
    export(str(trained_checkpoint("mesh", tmp / "mesh-ckpt")), str(tmp / "mesh-hf"))
    g = torch.Generator().manual_seed(2)
    lengths = [40, 10, 50, 33, 60]  # the 10-token document is too short and skipped
    docs = [torch.randint(2, SECTION["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    write_indexed_dataset(docs, str(tmp / "data" / "docs"), SECTION["vocab_size"])
    return base, tmp / "mesh-hf", tmp / "data" / "docs"


def tool():
    if str(REPO / "tools") not in sys.path:  # as `python tools/X.py` has it: for `import _bootstrap`
        sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("probe_tool", REPO / "tools" / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def argv(inputs, out, *extra):
    base, mesh, data = inputs
    return ["--model", str(base), "--model", str(mesh), "--data", str(data), "--samples",
            str(SAMPLES), "--seq-length", str(SEQ), "--out", str(out), *extra]


def test_probe_two_models(inputs, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "probe"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "probe.py"),
                          *argv(inputs, out, "--name", "base", "--name", "mesh", "--batch-size", "2")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "probe mesh" in run.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["cka.png", "probe.json", "spectrum.png",
                                                      "update_magnitude.png"]
    assert not list(tmp_path.glob(".probe.tmp*"))
    for name in ("update_magnitude.png", "cka.png", "spectrum.png"):
        assert (out / name).read_bytes()[:8] == PNG
        assert Image.open(out / name).size == (2 * 450, 400)  # one 450 x 400 panel per model

    report = json.loads((out / "probe.json").read_text())
    assert report["settings"]["samples"] == SAMPLES
    base, mesh = report["models"]
    assert (base["name"], mesh["name"]) == ("base", "mesh")
    assert (base["state_scheme"], mesh["state_scheme"], mesh["layout"]) == ("base", "mesh", "1+2R2+1")
    assert mesh["path"] == str(inputs[1]) and (mesh["samples"], mesh["seq_length"]) == (SAMPLES, SEQ)
    for model in (base, mesh):
        assert model["update_magnitude"]["blocks"] == ["prelude", "core 1", "core 2", "coda"]
        assert len(model["update_magnitude"]["mean"]) == len(model["update_magnitude"]["std"]) == 4
        assert model["cka"]["states"] == ["h_emb", "h(0)", "h(1)", "h(2)", "h_out"]
        for kind in ("rbf", "linear"):
            for stat in ("mean", "std"):
                assert torch.tensor(model["cka"][kind][stat]).shape == (5, 5)
        assert torch.tensor(model["spectrum"]["mean"]).shape == (5, SEQ)
        assert torch.tensor(model["spectrum"]["std"]).shape == (5, SEQ)
    assert base["routers"] is None
    steps = mesh["routers"]["steps"]
    assert [s["step"] for s in steps] == [-1, 0, 1]
    assert steps[2]["coefficients"]["sources"] == ["emb", "prelude", "core0", "core1"]
    assert len(steps[0]["read"]["mean"]) == mesh["routers"]["buffer_slots"] == 5
    assert 0 <= steps[1]["write"]["entropy"]["normalized_mean"] <= 1

    # a second run into the non-empty directory is refused and leaves it as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as err:
        tool().main(argv(inputs, out))
    assert "exists and is not empty (use --force" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_errors(inputs, tmp_path):
    main = tool().main
    cases = [
        (argv(inputs, tmp_path / "a", "--samples", "10"), "only 4 documents have >= 32 tokens"),
        (argv(inputs, tmp_path / "b", "--seq-length", "65"), "exceeds the max_sequence_length 64"),
        (argv(inputs, tmp_path / "c", "--name", "x"), "--name given 1 times for 2 --model"),
        (["--model", str(tmp_path), "--data", str(inputs[2]), "--out", str(tmp_path / "d")],
         "neither a Megatron checkpoint"),
        (["--model", str(inputs[0]), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e")],
         "nope: neither an indexed dataset prefix"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as err:
            main(args)
        assert str(err.value).startswith("error: ") and message in str(err.value), args
    assert not list(tmp_path.iterdir())  # no output directory left behind
