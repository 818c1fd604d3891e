"""Finding the iteration directory of a Megatron checkpoint save directory, and loading one
saved under another layer spec."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """Not a checkpoint, or one that disagrees with its config."""


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
    from torch.distributed.checkpoint import FileSystemReader

    needed: dict = {}
    for item in FileSystemReader(str(ckpt)).read_metadata().storage_data.values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    problems = []
    for name, size in sorted(needed.items()):
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the checkpoint's metadata)")
        elif path.stat().st_size < size:
            problems.append(f"{path}: truncated, {path.stat().st_size:,} bytes of at least {size:,}")
    return problems


def check_complete(ckpt: Path, how_to_load: str) -> None:
    """CheckpointError naming every missing or truncated file of ``ckpt`` and the newest other
    iteration beside it that is complete (``how_to_load`` formatted with its ``iteration`` number
    and ``path``)."""
    problems = incomplete_files(ckpt)
    if not problems:
        return
    older = sorted(ckpt.parent.glob("iter_*"), reverse=True)
    intact = next((d for d in older if d != ckpt and (d / ".metadata").is_file()
                   and not incomplete_files(d)), None)
    hint = (f"{intact.name} is complete: "
            f"{how_to_load.format(iteration=int(intact.name[5:]), path=intact)}" if intact
            else "no other complete iteration beside it")
    raise CheckpointError(f"{ckpt}: incomplete checkpoint: {'; '.join(problems)}. {hint}")


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
