"""Exports written with the pinned transformers 4.x load and generate in transformers 5."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, random_batch, tiny_config

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

OVERLAY = Path(sys.executable).parents[1] / "transformers5"


@pytest.mark.skipif(not (OVERLAY / ".installed").exists(),
                    reason=f"{OVERLAY} missing: `make test` installs requirements/transformers5.txt there")
def test_exports_load_in_transformers_5(tmp_path, megatron_world):
    """Each export with its tokenizer (a tokenizer.json file given to the export, as GPT-NeoX-20B's
    is): the standard `generate(**tok(text))` call, which refused token_type_ids before."""
    from megatron_mesh.corpora.python_docs import pydoc_topics
    from megatron_mesh.data.indexed import train_bpe_tokenizer
    from megatron_mesh.hf.export import build_hf_model, save_tokenizer
    from megatron_mesh.model.gpt import MeshGPTModel

    tokenizer = f"{train_bpe_tokenizer(pydoc_topics()[:20], 400, tmp_path / 'tok')}/tokenizer.json"
    exports = []
    for layout, scheme in [("1+2R2+1", "mesh"), ("1+1R3+1", "anchor"), ("1+1+1+1", "static_comb"), ("3", "vanilla")]:
        config = tiny_config(layout, scheme, vocab_size=512)
        torch.manual_seed(0)
        model = MeshGPTModel(config).eval()
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        out = tmp_path / scheme
        build_hf_model(state, config).save_pretrained(out)
        save_tokenizer(tokenizer, out)
        tokens, positions = random_batch(config, seq=12)
        with torch.no_grad():
            torch.save({"tokens": tokens, "logits": model(tokens, positions)}, out / "reference.pt")
        exports.append(str(out))
    env = {**os.environ, "PYTHONPATH": str(OVERLAY), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "tests/hf/transformers5_load.py"), *exports],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 4 and all(r["version"].startswith("5.") for r in results)
    assert [r["class"] for r in results] == ["MegatronMeshForCausalLM"] * 3 + ["GPTNeoXForCausalLM"]
    for r in results:
        assert r["max_diff"] < 1e-4 and r["generate_matches"], r
        assert r["tokenizer_inputs"] == ["input_ids", "attention_mask"] and r["tokenizer_generate"] == 4, r
