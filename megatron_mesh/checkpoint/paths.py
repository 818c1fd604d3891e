"""Finding the iteration directory of a Megatron checkpoint save directory, verifying it before
anything loads it, and loading one saved under another layer spec.

The tracker (``latest_checkpointed_iteration.txt``) says which iteration a save directory's
readers load. Every way it can be wrong (missing beside ``iter_*`` directories, empty after a
kill during megatron's rewrite of it, garbled, pointing at an iteration that is not there) stops
the reader with an error naming the problem, the iterations there, the newest one that verifies
and the fix (``checkpoint_way_out``); no reader falls back to another iteration by itself.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from megatron_mesh.checkpoint import manifest
from megatron_mesh.errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
_ITERATION = re.compile(r"iter_(\d{7,})")
READER_HINT = "read {path} instead"


def tracked_iteration(save_dir) -> Optional[int]:
    """The iteration the tracker of ``save_dir`` points at (the last completed save), or None
    (no tracker yet, a converted 'release' checkpoint, or an unreadable tracker)."""
    tracker = Path(save_dir) / TRACKER
    text = tracker.read_text().strip() if tracker.is_file() else ""
    return int(text) if text.isdigit() else None


def iterations(save_dir) -> List[int]:
    """The iterations of the ``iter_XXXXXXX`` directories in ``save_dir``, ascending."""
    found = (_ITERATION.fullmatch(p.name) for p in Path(save_dir).glob("iter_*") if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def iteration_path(save_dir, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def read_tracker(save_dir, how_to_load: Optional[str] = READER_HINT, hashes: bool = True) -> Optional[str]:
    """The tracker's text (an iteration number or 'release'), None where there is no tracker;
    CheckpointError for anything else (``checkpoint_way_out`` says what to do)."""
    tracker = Path(save_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release" or text.isdigit():
        return text
    cause = (" (an empty file: the run was killed while megatron rewrote it)" if not text else "")
    raise CheckpointError(f"{tracker}: {text!r} is neither an iteration number nor 'release'{cause}. "
                          + checkpoint_way_out(save_dir, how_to_load, hashes))


def iteration_dir(path, iteration: Optional[int] = None, how_to_load: Optional[str] = READER_HINT,
                  hashes: bool = True) -> Path:
    """The directory holding one torch_dist checkpoint: ``path`` itself if it is one, else
    ``iter_XXXXXXX`` (``iteration``, or the tracker's) or ``release`` (converted checkpoints).
    Errors name the newest iteration that verifies with ``how_to_load`` (formatted with its
    ``iteration`` and ``path``; None: only the tracker fix applies) and the tracker fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / "metadata.json").is_file():
        return path
    if iteration is not None:
        found = iteration_path(path, iteration)
        if not (found / "metadata.json").is_file():
            raise CheckpointError(f"{found}: no torch_dist checkpoint for iteration {iteration} "
                                  f"({_absence(found)}). {checkpoint_way_out(path, how_to_load, hashes)}")
        return found
    text = read_tracker(path, how_to_load, hashes)
    if text is None:
        if iterations(path):
            raise CheckpointError(f"{untracked(path)}. {checkpoint_way_out(path, how_to_load, hashes)}")
        raise CheckpointError(f"{path}: not a Megatron checkpoint (no {TRACKER} and no metadata.json)")
    found = path / "release" if text == "release" else iteration_path(path, int(text))
    if not (found / "metadata.json").is_file():
        raise CheckpointError(f"{path / TRACKER} points at {found.name}, but {found} {_absence(found)}. "
                              + checkpoint_way_out(path, how_to_load, hashes, skip=found))
    return found


def untracked(save_dir) -> str:
    return f"{save_dir}: no {TRACKER} beside its checkpoints (deleted, or left out of a copy)"


def _absence(ckpt: Path) -> str:
    return ("does not exist" if not ckpt.exists()
            else "has no metadata.json: not a complete torch_dist checkpoint")


def checkpoint_way_out(save_dir, how_to_load: Optional[str] = READER_HINT, hashes: bool = True,
                       skip: Optional[Path] = None) -> str:
    """The iterations in ``save_dir``, the newest that verifies (other than ``skip``) and how to
    go on from it: write its number to the tracker, or ``how_to_load`` (formatted with its
    ``iteration`` and ``path``)."""
    save_dir = Path(save_dir)
    found = iterations(save_dir)
    if not found:
        return f"{save_dir} holds no iteration directories (iter_*)"
    listing = f"iterations in {save_dir}: {_listing(found)}"
    intact = newest_intact_in(save_dir, hashes, skip)
    if intact is None:
        newest = iteration_path(save_dir, found[-1])
        why = checkpoint_problems(newest, hashes=hashes)
        return f"{listing}; none of them verifies" + (f" (the newest: {why[0]})" if why else "")
    number = int(intact.name[5:])
    fixes = [f"write its number to the tracker (`echo {number} > {save_dir / TRACKER}`)"]
    if how_to_load:
        fixes.append(how_to_load.format(iteration=number, path=intact))
    return f"{listing}; the newest that verifies is {intact.name}: {', or '.join(fixes)}"


def _listing(numbers: List[int]) -> str:
    if len(numbers) <= 6:
        return ", ".join(map(str, numbers))
    return f"{numbers[0]}, {numbers[1]}, ..., {numbers[-2]}, {numbers[-1]} ({len(numbers)} in all)"


@contextlib.contextmanager
def replacing_file(path) -> Iterator:
    """A text file written whole beside ``path``, fsync'ed and renamed over it when the block
    ends without error (else removed): a reader sees the old contents or the new, never a
    truncated file, and a crash after the block keeps the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself reaches the disk
        os.fsync(directory)
    finally:
        os.close(directory)


def incomplete_files(ckpt: Path) -> List[str]:
    """What is missing or cut short in one torch_dist iteration directory: each data file must
    reach the end of the last item its metadata (.metadata) places in it. Cheap (one stat per
    file), and names the file a bare EOFError of torch's reader would not."""
    try:
        extents = manifest.storage_extents(ckpt)
    except manifest.ManifestError as err:
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


def checkpoint_problems(ckpt: Path, share: Tuple[int, int] = (0, 1), hashes: bool = True) -> List[str]:
    """What keeps ``ckpt`` from loading intact: missing or cut-short files (always, one stat
    each) and, with ``hashes``, a missing integrity manifest or every mismatch against it for
    this reader's ``share`` of the files (megatron_mesh.checkpoint.manifest). Without
    ``hashes`` a checkpoint without a manifest passes on its sizes."""
    try:  # .metadata read once: the size check and the manifest's cross-check
        extents = manifest.storage_extents(ckpt)
        problems = _short_files(ckpt, extents)
        if problems or not hashes:
            return problems
        if not manifest.has_manifest(ckpt):
            return [f"{ckpt / manifest.MANIFEST_DIR}: missing, so the contents of its "
                    f"files cannot be checked (left out of a copy, or saved before megatron-mesh "
                    f"wrote manifests, or by another tool)"]
        return manifest.problems(ckpt, share, extents)
    except manifest.ManifestError as err:
        return [str(err)]


def verify(ckpt: Path, how_to_load: str, how_to_skip: str = "", share: Tuple[int, int] = (0, 1),
           hashes: bool = True) -> None:
    """CheckpointError naming every problem of ``ckpt`` (``checkpoint_problems``), the newest
    other iteration beside it that verifies (``how_to_load`` formatted with its ``iteration``
    number and ``path``) and, where the files are whole (a missing manifest or a hash
    mismatch), ``how_to_skip`` the hash check."""
    problems = checkpoint_problems(ckpt, share, hashes)
    if not problems:
        return
    intact = newest_intact(ckpt, hashes)
    hint = (f"{intact.name} verifies: "
            f"{how_to_load.format(iteration=int(intact.name[5:]), path=intact)}" if intact
            else "no other iteration beside it verifies")
    whole = hashes and not incomplete_files(ckpt)  # sizes are never skipped
    skip = f". To load it unverified anyway: {how_to_skip}" if whole and how_to_skip else ""
    kind = ("unverifiable checkpoint" if whole and not manifest.has_manifest(ckpt)
            else "damaged checkpoint")
    raise CheckpointError(f"{ckpt}: {kind}: {'; '.join(problems)}. {hint}{skip}")


def newest_intact(ckpt: Path, hashes: bool = True) -> Optional[Path]:
    """The newest ``iter_*`` directory beside ``ckpt`` that loads intact (all its files read)."""
    return newest_intact_in(ckpt.parent, hashes, skip=ckpt)


def newest_intact_in(save_dir, hashes: bool = True, skip: Optional[Path] = None) -> Optional[Path]:
    """The newest ``iter_*`` directory of ``save_dir`` (other than ``skip``) that loads intact."""
    for number in reversed(iterations(save_dir)):
        other = iteration_path(save_dir, number)
        if other != skip and (other / ".metadata").is_file() and not checkpoint_problems(
                other, hashes=hashes):
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

    from megatron_mesh.checkpoint.unpickle import metadata_of

    if not (Path(checkpoint_dir) / ".metadata").is_file():  # not torch_dist: nothing to check
        return []
    saved = metadata_of(checkpoint_dir).state_dict_metadata
    kept: List[str] = []

    def keep_if_missing(value):
        if (isinstance(value, ShardedObject) and value.key.endswith("._extra_state")
                and value.unique_key not in saved):
            kept.append(value.key)
            return LocalNonpersistentObject(value.data)
        return value

    dict_list_map_inplace(keep_if_missing, sharded_state_dict)
    return kept
