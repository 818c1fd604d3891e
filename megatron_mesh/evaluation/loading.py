"""Any trained model as an in-process ``MeshGPTModel``: a Megatron checkpoint or an HF directory.

Probes and depth studies need the block's intermediate states (``forward(states=[...])``) and
the ``num_loops`` read-out, which only the megatron-core model has; this puts either kind of
checkpoint into it, on one process, in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megatron_mesh.checkpoint.paths import TRACKER, iterations
from megatron_mesh.errors import CheckpointError, ConfigError
from megatron_mesh.evaluation.names import model_name

if TYPE_CHECKING:  # megatron-core loads with the model, not with this module
    from megatron_mesh.config.model import MeshConfig


@dataclass
class LoadedModel:
    model: "torch.nn.Module"
    """MeshGPTModel in eval mode, fp32, single process."""
    name: str
    """A short label for tables and figure panels (``names.model_name``: the run, not
    'checkpoints')."""
    tokenizer: Optional[str]
    """What the checkpoint says tokenized its data (path or tokenizer name), if it says."""

    @property
    def config(self) -> MeshConfig:
        """The model's config (layout, state_scheme, sizes): what it was built from."""
        return self.model.config


def is_hf_directory(path) -> bool:
    return (Path(path) / "config.json").is_file()


def is_megatron_checkpoint(path) -> bool:
    """A save directory (with its tracker, or with iteration directories: the reader then says
    what the tracker lacks) or one iteration directory."""
    path = Path(path)
    return (path / TRACKER).is_file() or (path / "metadata.json").is_file() or bool(iterations(path))


def load_model(path, iteration: Optional[int] = None, device: str = "cpu",
               verify_hashes: bool = True) -> LoadedModel:
    """The model in ``path`` (Megatron checkpoint directory, verified against its integrity
    manifest unless ``verify_hashes`` is False; or HF export / GPT-NeoX directory)."""
    path = Path(path)
    _check_device(device)
    if is_megatron_checkpoint(path):
        model, tokenizer = _from_megatron(path, iteration, verify_hashes)
    elif is_hf_directory(path):
        model, tokenizer = _from_hf(path)
    else:
        raise CheckpointError(f"{path}: neither a Megatron checkpoint (no {TRACKER}) nor a Hugging "
                              f"Face model directory (no config.json)")
    model.to(device).eval()
    # megatron's RotaryEmbedding keeps inv_freq as a plain attribute (not a buffer): .to() skips it
    rotary = model.rotary_pos_emb
    rotary.inv_freq = rotary.inv_freq.to(device)
    return LoadedModel(model, model_name(path), tokenizer)


def directory_tokenizer(path: Path) -> Optional[str]:
    """The tokenizer an HF model directory holds (its tokenizer.json), if it holds one."""
    return str(path.resolve()) if (path / "tokenizer.json").is_file() else None


def checkpoint_tokenizer(args) -> Optional[str]:
    """The tokenizer a Megatron checkpoint's saved args name (a path or hub name); None for
    e.g. NullTokenizer."""
    return getattr(args, "tokenizer_model", None)


def _check_device(device: str) -> None:
    """megatron-core puts rotary tables and its process group on the current CUDA device
    whenever CUDA exists, so a CPU run needs CUDA hidden and a GPU run its device current."""
    dev = torch.device(device)
    if dev.type == "cpu" and torch.cuda.is_available():
        raise ConfigError(f"device {device!r} on a machine with CUDA: megatron-core would still "
                          f"place tensors on the GPU; run with CUDA_VISIBLE_DEVICES= to use the CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)


def _from_megatron(path: Path, iteration: Optional[int], verify_hashes: bool):
    from megatron_mesh.checkpoint.reader import load_checkpoint, saved_model_config
    from megatron_mesh.checkpoint.reader import build_model

    state, common = load_checkpoint(str(path), iteration, verify_hashes)
    args = common.get("args")
    config = saved_model_config(args)  # build_model checks every tensor's name and shape
    return build_model(config, state), checkpoint_tokenizer(args)


def _from_hf(path: Path):
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.hf.importer import hf_model_config, megatron_state_from_hf, read_hf_directory

    hf_config, hf_state = read_hf_directory(path)
    config = hf_model_config(path, hf_config)
    state = megatron_state_from_hf(hf_config, hf_state, config)
    return build_model(config, state), directory_tokenizer(path)
