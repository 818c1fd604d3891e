"""An export loads with the project's own classes, never running its folder's Python files; a
foreign model's code runs only when the user trusts it (evaluate.py --trust-remote-code)."""

import importlib.util
import json
import shutil

import pytest
import torch

from conftest import REPO
from toy_tasks import tiny_export

OWN_MODULE = "megatron_mesh.hf.modeling_megatron_mesh"


@pytest.fixture(scope="module")
def export(tmp_path_factory, megatron_world):
    return tiny_export(tmp_path_factory.mktemp("auto"))


def planted(export, folder, marker, model_type=None):
    """A copy of ``export`` whose Python files write ``marker`` when imported; with
    ``model_type``, a foreign model of that type (config and configuration file renamed)."""
    shutil.copytree(export, folder)
    for name in ("modeling_megatron_mesh.py", "configuration_megatron_mesh.py"):
        path = folder / name
        code = path.read_text()
        if model_type:
            code = code.replace('model_type = "megatron_mesh"', f'model_type = "{model_type}"')
        path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + code)
    if model_type:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return folder


def logits(model):
    with torch.no_grad():
        return model(torch.arange(12).unsqueeze(0), use_cache=False).logits


def test_an_export_runs_none_of_its_files(export, tmp_path):
    from megatron_mesh.evaluation.perplexity import load_scorer
    from megatron_mesh.hf.auto import load_causal_lm

    marker = tmp_path / "ran"
    folder = planted(export, tmp_path / "export", marker)
    reference = logits(load_causal_lm(export))
    for trust in (False, True):  # the flag is for foreign code: an export is never that
        model = load_causal_lm(folder, trust_remote_code=trust)
        assert type(model).__module__ == OWN_MODULE
        assert torch.equal(logits(model), reference)
    scorer = load_scorer(folder, trust_remote_code=True)  # what `evaluate.py ppl` loads
    assert scorer.backend == "hf" and scorer.logits(torch.arange(12).unsqueeze(0)).isfinite().all()
    assert not marker.exists()


def test_foreign_code_runs_only_when_trusted(export, tmp_path):
    from megatron_mesh.hf.auto import load_causal_lm

    marker = tmp_path / "ran"
    foreign = planted(export, tmp_path / "foreign_model", marker, model_type="foreign_mesh")
    with pytest.raises(ValueError, match=f"{foreign}: its model loads only by running the Python "
                                         f"files.*pass --trust-remote-code"):
        load_causal_lm(foreign)
    assert not marker.exists()
    model = load_causal_lm(foreign, trust_remote_code=True)
    assert marker.exists() and type(model).__module__ != OWN_MODULE  # the folder's own class
    assert torch.equal(logits(model), logits(load_causal_lm(export)))


def test_evaluate_ppl_takes_the_flag(export, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    marker = tmp_path / "ran"
    foreign = planted(export, tmp_path / "foreign_cli", marker, model_type="foreign_cli")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"text number {i} for the model"}) + "\n" for i in range(3)))
    ppl = ["ppl", "--model", str(foreign), "--data", str(docs), "--seq-length", "16", "--no-progress"]
    with pytest.raises(SystemExit, match="pass --trust-remote-code"):
        tool.main(ppl)
    assert not marker.exists()
    tool.main([*ppl, "--trust-remote-code"])
    assert marker.exists() and "foreign_cli" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                    reason="lm-evaluation-harness is not installed (not in the GPU image)")
def test_lm_eval_gets_the_export_loaded_by_the_own_class(export, tmp_path):
    from megatron_mesh.evaluation.downstream import harness_model

    marker = tmp_path / "ran"
    lm = harness_model(planted(export, tmp_path / "export", marker), 2, "cpu", "float32", False)
    assert type(lm.model).__module__ == OWN_MODULE and not marker.exists()
