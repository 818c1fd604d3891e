import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

# The suite means the CPU wherever it runs: on a GPU machine its tolerances, gloo ranks and CPU
# shims would otherwise meet CUDA (TE, NCCL, TF32, both ranks on GPU 0). Hidden before torch first
# queries CUDA; torchrun ranks and other subprocesses inherit it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # tests that load a tool in-process: its `import _bootstrap`

import megatron_mesh  # noqa: E402,F401  (CPU shims before megatron.core)

if torch.cuda.is_available():
    raise RuntimeError("tests/conftest.py: CUDA was initialized before the suite could hide the GPUs")

# `make test` runs the suite in parallel (pytest-xdist): the cores are shared between its workers
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@pytest.fixture(scope="session")
def megatron_world():
    """One-process torch.distributed + megatron model-parallel state (TP = PP = 1)."""
    from megatron_mesh.parallel.process_groups import initialize_single_process

    initialize_single_process(seed=1234)


def tiny_config(layout="1+2R2+1", scheme="mesh", **overrides):
    """A tiny MeshConfig; ``overrides`` may set model keys and other TransformerConfig fields."""
    from megatron_mesh.config.model import MODEL_KEYS, MeshConfig

    section = dict(layout=layout, state_scheme=scheme, hidden_size=64, num_attention_heads=4,
                   vocab_size=96, max_sequence_length=64)
    section.update({k: v for k, v in overrides.items() if k in MODEL_KEYS})
    return MeshConfig.from_section(section, **{k: v for k, v in overrides.items() if k not in MODEL_KEYS})


def random_batch(cfg, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    return tokens, positions


def model_configs():
    """Every shipped config file that defines a model (train/ holds training-only fragments)."""
    from megatron_mesh.config.yaml_file import load_config_tree

    files = sorted(Path(REPO, "configs").rglob("*.yml"))
    return [p for p in files if "model" in load_config_tree(p)[0]]


def megatron_args(config, overrides=(), passthrough=()):
    """Megatron's arguments for a YAML config as the trainer builds them: ``megatron_argv``
    (plus flags passed through after ``--``), Megatron's parser with ours, and ``validate_args``,
    which fills what the FLOP count reads (kv_channels, num_query_groups, ...)."""
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from megatron_mesh.config.yaml_file import load_config_tree
    from megatron_mesh.training.arguments import add_mesh_arguments, megatron_argv

    parser = add_mesh_arguments(add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(megatron_argv(*load_config_tree(config, overrides)) + list(passthrough))
    args.rank, args.world_size = 0, 1  # what megatron's parse_args reads from the environment
    with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
        validate_args(args, {})
    return args
