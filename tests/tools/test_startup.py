"""What a new user meets first: every tool's --help (exit 0, a usage line, none of torch,
megatron or transformers imported: they cost seconds, and each tool imports them after parsing),
the trainer's --print-args on a machine without a GPU, and importing megatron-core."""

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py") if not p.name.startswith("_"))  # _bootstrap.py
SUBCOMMANDS = {"evaluate.py": ("lm-eval", "ppl", "depth"), "convert.py": ("megatron-to-hf", "hf-to-megatron"),
               "benchmark_data.py": ("preprocess", "open-index")}
HEAVY = ("torch", "megatron", "transformers", "megatron_mesh")

# runs a tool as `python tools/X.py ARGS...` would (its directory first on sys.path), then reports
# the heavy modules it imported
WRAPPER = """
import os, runpy, sys
tool, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(tool))
try:
    runpy.run_path(tool, run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code
print("IMPORTED:" + ",".join(m for m in %r if m in sys.modules), file=sys.stderr)
sys.exit(code)
""" % (HEAVY,)


def run_help(tool, *args):
    return subprocess.run([sys.executable, "-c", WRAPPER, str(REPO / "tools" / tool), *args, "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_every_tool_is_covered():
    assert len(TOOLS) >= 15 and "pretrain_mesh.py" in TOOLS and "study.py" in TOOLS


@pytest.mark.parametrize("tool, args", [(t, ()) for t in TOOLS]
                         + [(t, (sub,)) for t, subs in SUBCOMMANDS.items() for sub in subs])
def test_help_imports_nothing_heavy(tool, args):
    out = run_help(tool, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: "), out.stdout[:200]
    assert "IMPORTED:\n" in out.stderr, out.stderr[-2000:]  # the list after the colon is empty


def test_help_names_the_values_it_cannot_import():
    """batch_viewer and build_corpus name a library constant in --help without importing it."""
    from megatron_mesh.corpora.debian_docs import DEFAULT_PACKAGES
    from megatron_mesh.data.pythia import BOUNDARIES

    viewer = " ".join(run_help("batch_viewer.py").stdout.split())
    assert all(b in viewer for b in BOUNDARIES) and "per_row (default)" in viewer
    corpus = " ".join(run_help("build_corpus.py").stdout.split())
    assert f"(default: {' '.join(DEFAULT_PACKAGES)})" in corpus


@pytest.mark.slow
def test_print_args_needs_no_gpu():
    """--print-args only prints: without --cpu on a CPU machine it shows the GPU run's flags."""
    from trainer import CONFIG, env

    out = subprocess.run([sys.executable, str(REPO / "tools" / "pretrain_mesh.py"), "--config", str(CONFIG),
                          "--print-args"], capture_output=True, text=True, cwd=REPO, env=env(), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    argv = out.stdout.split()
    assert "--num-layers" in argv and "--mesh-config-file" in argv
    assert "gloo" not in argv and "--use-cpu-initialization" not in argv  # not the CPU run's


@pytest.mark.slow
def test_megatron_core_imports_as_the_readme_says():
    """After the package (its CPU shims), always; alone only where triton is installed."""
    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              timeout=120)

    after = run("import megatron_mesh, megatron.core")
    assert after.returncode == 0, after.stderr[-2000:]
    alone = run("import megatron.core")
    if importlib.util.find_spec("triton") is None:
        assert alone.returncode != 0 and "No module named 'triton'" in alone.stderr  # README, Installing
    else:
        assert alone.returncode == 0, alone.stderr[-2000:]
