"""Finding the iteration directory of a Megatron checkpoint save directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """Not a checkpoint, or one that disagrees with its config."""


def iteration_dir(path, iteration: Optional[int] = None) -> Path:
    """The directory holding one torch_dist checkpoint: ``path`` itself if it is one, else
    ``iter_XXXXXXX`` (``iteration``, or the tracker's) or ``release`` (converted checkpoints)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    tracker = path / TRACKER
    if iteration is None:
        if not tracker.is_file():
            raise CheckpointError(f"{path}: not a Megatron checkpoint (no {TRACKER} and no metadata.json)")
        text = tracker.read_text().strip()
        if text == "release":
            found = path / "release"
        elif text.isdigit():
            found = path / f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{tracker}: {text!r} is neither an iteration number nor 'release'")
    else:
        found = path / f"iter_{iteration:07d}"
    if not (found / "metadata.json").is_file():
        raise CheckpointError(f"{found}: no torch_dist checkpoint"
                              + (f" for iteration {iteration}" if iteration is not None else ""))
    return found
