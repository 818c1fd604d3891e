"""tools/model_stats.py on the real configs, built on the meta device."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, model_configs

pytestmark = pytest.mark.slow  # real subprocesses (torchrun, the tools): make test-fast skips them

TOOL = REPO / "tools" / "model_stats.py"

# Paper Table 5 (Pythia-1.4B, vocab 50304, untied embeddings)
TABLE_5 = {
    "pythia-1.4b-24-vanilla.yml": (1_208_602_624, 0),
    "pythia-1.4b-4+8R2+4-base.yml": (805_736_448, 0),
    "pythia-1.4b-4+8R2+4-mesh.yml": (805_797_918, 61_470),
}


def run_tool(*args):
    out = subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    return out


@pytest.mark.parametrize("name", sorted(TABLE_5))
def test_table_5_counts_are_exact(name):
    out = run_tool("--config", f"configs/{name}")
    assert out.returncode == 0, out.stderr
    non_embedding, routers = TABLE_5[name]
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.splitlines())
    assert rows["non-embedding parameters"] == f"{non_embedding:,}"
    assert rows["scheme parameters"] == f"{routers:,}"


def test_json_output_and_flops_count_every_core_application():
    out = run_tool("--config", "configs/pythia-1.4b-4+8R2+4-mesh.yml", "--json", "--seq-length", "4096")
    stats = json.loads(out.stdout)
    assert stats["n_compute"] == 24 and stats["unique_layers"] == 16
    assert stats["embedding_params"] == 2 * 50304 * 2048
    # per layer application: 12 h^2 + 8 h matmul-weight FLOP factor; checked by hand:
    h, s, v, layers = 2048, 4096, 50304, 24
    per_layer = 3 * h * h + h * h + 2 * h * 4 * h
    routers = 3 * 2 * 2048 * 5
    # megatron-core's convention: core attention 12 * s * q per application, halved (causal)
    expected = 6 * (layers * per_layer + routers) + 6 * layers * s * h + 6 * h * v
    assert stats["train_flops_per_token"] == expected
    assert stats["megatron_train_flops_per_token"] is None  # looped: megatron has no count


def test_vanilla_flops_printed_beside_megatron_cores_own_count():
    out = run_tool("--config", "configs/pythia-1.4b-24-vanilla.yml")
    assert out.returncode == 0, out.stderr
    assert "FLOP convention                  megatron-core's (causal attention halved)" in out.stdout
    assert "training FLOPs/token (seq 4096)  9.0739e+09" in out.stdout
    assert "megatron-core FLOPs/token        9.0739e+09 (equal)" in out.stdout
    stats = json.loads(run_tool("--config", "configs/pythia-160m-12-vanilla.yml", "--json").stdout)
    assert stats["megatron_train_flops_per_token"] == stats["train_flops_per_token"] == 967_901_184


def test_all_configs_build_on_meta_device():
    sys.path.insert(0, str(REPO / "tools"))
    from model_stats import build_stats

    for path in model_configs():
        stats = build_stats(path)
        assert stats.non_embedding_params > 0, path


def test_bad_config_exits_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("extends: %s\nmodel:\n  buffer_slot: 4\n" % (REPO / "configs/tiny-cpu.yml"))
    out = run_tool("--config", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "unknown key 'model.buffer_slot'; did you mean 'model.buffer_slots'" in out.stderr
