"""Unpickling checkpoint content by an allowlist: the code a checkpoint reader trusts is its own.

A torch_dist checkpoint is partly pickles: torch's ``.metadata`` (FileSystemReader.read_metadata
reads it with ``pickle.load``) and, inside the ``.distcp`` files, every non-tensor item -- the
common state megatron saves (args, iteration, optimizer param groups), RNG and rerun state, TE's
extra state -- which DefaultLoadPlanner.load_bytes reads with ``torch.load(weights_only=False)``;
an old save's ``common.pt`` too. A pickle calls whatever it names, so a planted one would run
its code in every reader of a shared or downloaded checkpoint. The integrity manifest
(megatron_mesh.checkpoint.manifest) is no defence: it guards against corruption, and whoever
plants a pickle can regenerate it. So here:

- ``.metadata`` is read by an unpickler whose ``find_class`` admits only what megatron-core's
  saves put there (read off real saves): torch.distributed.checkpoint's metadata and save-plan
  dataclasses, torch.Size, dtypes and layouts, megatron's two placeholder classes of older saves;
- the other items are ``torch.save`` payloads, read with ``torch.load(weights_only=True)``
  (torch's rules: tensors, storages, containers, numbers, strings) admitting in addition the
  types megatron-core's own saves hold (its ``SAFE_GLOBALS``: argparse.Namespace, its enums and
  rerun state, numpy's RNG arrays, signal.Signals, ...).

Anything else stops the read before it is called, with RefusedPickleError naming the file and
the global. The project's readers use ``Reader``, ``Planner`` and ``metadata_of``; megatron's
own loads (the trainer's resume) get the same functions from
megatron_mesh.training.megatron_fixes.apply_trainer.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from pathlib import Path
from typing import Any, BinaryIO, FrozenSet, Iterator, List, Optional, Tuple

import torch
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_mesh.errors import CheckpointError

_DCP = "torch.distributed.checkpoint"
METADATA_GLOBALS: FrozenSet[Tuple[str, str]] = frozenset({
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a torch.layout from its name
    # empty classes megatron-core keeps so that .metadata of its older saves unpickles
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
})
"""The globals a ``.metadata`` may name, besides torch's dtypes, layouts and memory formats."""

_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class RefusedPickleError(CheckpointError):
    """A checkpoint file names a global outside the allowlist; nothing it names was called."""

    def __init__(self, source, refused: str, why: str = "not an allowed checkpoint type"):
        super().__init__(f"refusing to unpickle {refused} from {source}: {why}")
        self.source, self.refused = str(source), refused


def object_types() -> List[type]:
    """What ``torch.save`` payloads of a megatron-core save hold beyond torch's weights_only
    rules: megatron-core's own list (core/safe_globals.py), which megatron also registers
    process-wide when imported; named here so that the rule does not depend on that. Also the
    rerun state machine's record of a failed validation (rerun_state_machine.py:46-57, named
    tuples of str and int), which megatron saves after a NaN/Inf (``rerun_state_machine_state``)
    but leaves out of its list."""
    from megatron.core.rerun_state_machine import Call, Caller
    from megatron.core.safe_globals import SAFE_GLOBALS

    return [*SAFE_GLOBALS, Call, Caller]


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        # checked before super() imports anything: importing a module runs its code
        torch_constant = module == "torch" and isinstance(vars(torch).get(name), _TORCH_CONSTANTS)
        if (module, name) in METADATA_GLOBALS or torch_constant:
            return super().find_class(module, name)
        raise RefusedPickleError(self._source, f"{module}.{name}")


def unpickle_metadata(file: BinaryIO, source) -> Any:
    """A ``.metadata`` pickle from ``file`` (named ``source`` in errors) by METADATA_GLOBALS."""
    return _MetadataUnpickler(file, source).load()


def load_object(file: BinaryIO, source) -> Any:
    """A ``torch.save`` payload (seekable ``file``) by torch's weights_only rules and
    ``object_types``. The globals it names are listed first, without running it, so that the
    error names them; the weights_only unpickler then enforces the rules while it loads."""
    with torch.serialization.safe_globals(object_types()):
        refused = _unsafe_globals(file)
        if refused:
            raise RefusedPickleError(source, ", ".join(sorted(refused)))
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # e.g. a global the listing could not see
            raise _refusal(source, err) from None


def _unsafe_globals(file: BinaryIO) -> List[str]:
    start = file.tell()
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (ValueError, pickle.UnpicklingError):  # not torch.save's zip format, or opcodes the
        return []                                   # listing skips: torch.load's rules decide
    finally:
        file.seek(start)


def _refusal(source, err: pickle.UnpicklingError) -> RefusedPickleError:
    """The refusal for what torch's weights_only unpickler stopped at (e.g. an opcode the
    listing of globals cannot follow), its reason cut out of torch's long message."""
    reason = str(err).split("WeightsUnpickler error:", 1)[-1].strip().split("\n\n")[0]
    return RefusedPickleError(source, "it", f"torch's weights_only unpickler: {reason}")


_READING: contextvars.ContextVar[Optional[Path]] = contextvars.ContextVar(
    "megatron_mesh_checkpoint_read", default=None)
"""The checkpoint directory a FileSystemReader.read_data call reads: load_bytes names its files."""


def read_metadata(self: FileSystemReader, *args, **kwargs) -> Metadata:
    """FileSystemReader.read_metadata (torch/distributed/checkpoint/filesystem.py:926, the same
    in torch 2.11 and 2.13) with ``.metadata`` read by ``unpickle_metadata``, not pickle.load."""
    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as metadata_file:
        metadata = unpickle_metadata(metadata_file, path)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def naming_the_checkpoint(read_data):
    """FileSystemReader.read_data, telling the planner's load_bytes which directory it reads."""
    def read_data_naming_the_checkpoint(self, plan, planner):
        token = _READING.set(Path(str(self.path)))
        try:
            return read_data(self, plan, planner)
        finally:
            _READING.reset(token)
    return read_data_naming_the_checkpoint


def load_bytes(self: DefaultLoadPlanner, read_item, value) -> None:
    """DefaultLoadPlanner.load_bytes (torch/distributed/checkpoint/default_planner.py:382 in
    torch 2.13, :362 in 2.11, the same body) with the item read by ``load_object``, not
    torch.load(weights_only=False)."""
    loaded = load_object(value, _item_source(self, read_item))
    fqn = read_item.dest_index.fqn
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


def _item_source(planner: DefaultLoadPlanner, read_item) -> str:
    metadata = getattr(planner, "metadata", None)
    stored = metadata.storage_data.get(read_item.storage_index) if metadata else None
    name = stored.relative_path if stored else "a data file"
    directory = _READING.get()
    return f"{directory / name if directory else name} (item {read_item.dest_index.fqn})"


def load_common(checkpoint_dir) -> Any:
    """megatron's dist_checkpointing load_common (strategies/common.py:32: an older save's
    common.pt, which load_common_state_dict prefers wherever one exists) by ``load_object``."""
    path = Path(checkpoint_dir) / "common.pt"
    with open(path, "rb") as f:
        return load_object(f, path)


class Reader(FileSystemReader):
    """torch's FileSystemReader, unpickling by the allowlist."""

    read_metadata = read_metadata
    read_data = naming_the_checkpoint(FileSystemReader.read_data)


class Planner(DefaultLoadPlanner):
    """torch's DefaultLoadPlanner, unpickling non-tensor items by the allowlist."""

    load_bytes = load_bytes


def metadata_of(ckpt) -> Metadata:
    """The torch.distributed.checkpoint metadata (``.metadata``) of one iteration directory."""
    return Reader(str(ckpt)).read_metadata()


@contextlib.contextmanager
def refusals_unwrapped() -> Iterator[None]:
    """A refusal raised as itself out of torch.distributed.checkpoint.load, which wraps every
    rank's error in one CheckpointException (a BaseException: no ``except ValueError`` sees it)."""
    try:
        yield
    except CheckpointException as err:
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, RefusedPickleError)]
        if not refused:
            raise
        raise refused[0] from None
