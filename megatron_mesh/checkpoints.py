"""Finding the iteration directory of a Megatron checkpoint save directory, verifying it before
anything loads it, and loading one saved under another layer spec."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Tuple

from megatron_mesh import checkpoint_manifest

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """Not a checkpoint, or one that disagrees with its config."""


def tracked_iteration(save_dir) -> Optional[int]:
    """The iteration the tracker of ``save_dir`` points at (the last completed save), or None
    (no tracker yet, or a converted 'release' checkpoint)."""
    tracker = Path(save_dir) / TRACKER
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else None


def iteration_dir(path, iteration: Optional[int] = None) -> Path:
    """The directory holding one torch_dist checkpoint: ``path`` itself if it is one, else
    ``iter_XXXXXXX`` (``iteration``, or the tracker's) or ``release`` (converted checkpoints)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
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


def incomplete_files(ckpt: Path) -> List[str]:
    """What is missing or cut short in one torch_dist iteration directory: each data file must
    reach the end of the last item its metadata (.metadata) places in it. Cheap (one stat per
    file), and names the file a bare EOFError of torch's reader would not."""
    try:
        extents = checkpoint_manifest.storage_extents(ckpt)
    except checkpoint_manifest.ManifestError as err:
        return [str(err)]
    return _short_files(ckpt, extents)


def _short_files(ckpt: Path, extents) -> List[str]:
    problems = []
    for name, size in sorted(extents.items()):
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the checkpoint's metadata)")
        elif path.stat().st_size < size:
            problems.append(f"{path}: truncated, {path.stat().st_size:,} bytes of at least {size:,}")
    return problems


class CheckpointWarning(UserWarning):
    """A checkpoint loads, but could not be verified as fully as a current one."""


def checkpoint_problems(ckpt: Path, share: Tuple[int, int] = (0, 1), hashes: bool = True,
                        warn: bool = True) -> List[str]:
    """What keeps ``ckpt`` from loading intact: missing or cut-short files (always, one stat
    each) and, with ``hashes``, every mismatch against its integrity manifest for this
    reader's ``share`` of the files (megatron_mesh.checkpoint_manifest). A checkpoint saved
    without a manifest gets the size check and a CheckpointWarning (when ``warn``)."""
    try:  # .metadata read once: the size check and the manifest's cross-check
        extents = checkpoint_manifest.storage_extents(ckpt)
        problems = _short_files(ckpt, extents)
        if problems or not hashes:
            return problems
        if not checkpoint_manifest.has_manifest(ckpt):
            if warn:
                warnings.warn(f"{ckpt}: no integrity manifest (saved by megatron-mesh before "
                              f"manifests, or by another tool): file sizes checked, contents "
                              f"not", CheckpointWarning, stacklevel=3)
            return []
        return checkpoint_manifest.problems(ckpt, share, extents)
    except checkpoint_manifest.ManifestError as err:
        return [str(err)]


def verify(ckpt: Path, how_to_load: str, how_to_skip: str = "", share: Tuple[int, int] = (0, 1),
           hashes: bool = True) -> None:
    """CheckpointError naming every problem of ``ckpt`` (``checkpoint_problems``), the newest
    other iteration beside it that verifies (``how_to_load`` formatted with its ``iteration``
    number and ``path``) and, for a hash mismatch, ``how_to_skip`` the check. Only the first
    reader of a ``share`` warns about a missing manifest."""
    problems = checkpoint_problems(ckpt, share, hashes, warn=share[0] == 0)
    if not problems:
        return
    intact = newest_intact(ckpt, hashes)
    hint = (f"{intact.name} verifies: "
            f"{how_to_load.format(iteration=int(intact.name[5:]), path=intact)}" if intact
            else "no other iteration beside it verifies")
    unverified = hashes and how_to_skip and not incomplete_files(ckpt)  # sizes are never skipped
    skip = f". To load it unverified anyway: {how_to_skip}" if unverified else ""
    raise CheckpointError(f"{ckpt}: damaged checkpoint: {'; '.join(problems)}. {hint}{skip}")


def newest_intact(ckpt: Path, hashes: bool = True) -> Optional[Path]:
    """The newest ``iter_*`` directory beside ``ckpt`` that loads intact (all its files read)."""
    for other in sorted(ckpt.parent.glob("iter_*"), reverse=True):
        if other != ckpt and (other / ".metadata").is_file() and not checkpoint_problems(
                other, hashes=hashes, warn=False):
            return other
    return None


def keep_missing_extra_state(sharded_state_dict, checkpoint_dir) -> List[str]:
    """Let a TransformerEngine model load a checkpoint saved without TE's ``_extra_state``.

    TE modules hold their fp8 scaling state in ``_extra_state`` entries, which megatron-core
    shards as ShardedObjects; a checkpoint written under the local spec (the CPU, ``convert.py
    hf-to-megatron``) has none for modules whose local counterpart keeps no extra state (e.g.
    the final norm), and torch's checkpoint planner stops on the first missing key. A missing
    extra state means "none saved", which is what a fresh module holds: such entries become
    LocalNonpersistentObjects, so the load hands each module its own current state back.
    Changes ``sharded_state_dict`` in place; returns the keys it kept. Only ``_extra_state``
    entries are ever kept: a missing weight still fails the load.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject
    from torch.distributed.checkpoint import FileSystemReader

    if not (Path(checkpoint_dir) / ".metadata").is_file():  # not torch_dist: nothing to check
        return []
    saved = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    kept: List[str] = []

    def keep_if_missing(value):
        if (isinstance(value, ShardedObject) and value.key.endswith("._extra_state")
                and value.unique_key not in saved):
            kept.append(value.key)
            return LocalNonpersistentObject(value.data)
        return value

    dict_list_map_inplace(keep_if_missing, sharded_state_dict)
    return kept
