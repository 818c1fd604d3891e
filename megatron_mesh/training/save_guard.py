"""What every checkpoint save of a training run guarantees beyond megatron's own.

- Each rank records the size and hash of the files it wrote in the iteration's manifest
  (megatron_mesh.checkpoint.manifest) before megatron's barrier and tracker update, so the
  tracker only ever points at an iteration every reader can verify.
- A model whose weights hold NaN or Inf is never saved: the tracker keeps pointing at the last
  good checkpoint and the run stops with an error naming the iteration and a tensor (megatron
  would save it, and a resume or export would then start from garbage).
- A failed write names its cause: megatron's writer logs the OSError (e.g. ENOSPC with the
  file) and raises "Worker failure: <class 'OSError'>" without it
  (dist_checkpointing/strategies/filesystem_async.py:284); the error here carries the logged
  cause, the free space of the checkpoint's filesystem and the iteration still intact.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from functools import partial
from pathlib import Path
from typing import Iterator, List

import torch

from megatron_mesh.checkpoint import manifest as checkpoint_manifest
from megatron_mesh.checkpoint.paths import TRACKER
from megatron_mesh.errors import MeshError
from megatron_mesh.training.megatron_fixes import wrap_once


class CheckpointSaveError(MeshError, RuntimeError):
    """A save did not complete; the message names the cause and what is still intact."""


class NonFiniteWeights(MeshError, RuntimeError):
    """The model's weights hold NaN or Inf; no checkpoint of them was written."""


def install() -> None:
    """Wrap megatron's checkpoint save for this training process (idempotent)."""
    from megatron.core import dist_checkpointing
    from megatron.training import training

    wrap_once(dist_checkpointing, "save", recording_manifests)
    wrap_once(training, "save_checkpoint", refusing_non_finite_weights)


def _rank_and_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def recording_manifests(save):
    def save_recording_manifest(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        with _named_failures(Path(checkpoint_dir)):
            request = save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        rank, world = _rank_and_world()
        if request is None:  # synchronous: this rank's files are complete
            checkpoint_manifest.write(checkpoint_dir, rank, world)
        else:  # asynchronous: after the writes, before megatron's tracker update (added later)
            request.add_finalize_fn(partial(_write_manifest_then_barrier, checkpoint_dir, rank, world))
        return request
    return save_recording_manifest


def _write_manifest_then_barrier(checkpoint_dir, rank: int, world: int) -> None:
    checkpoint_manifest.write(checkpoint_dir, rank, world)
    if world > 1:  # rank 0 updates the tracker in the next finalize step: every manifest first
        torch.distributed.barrier()


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: List[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _named_failures(ckpt: Path) -> Iterator[None]:
    """Re-raise a failed save (torch's CheckpointException is a BaseException) as a
    CheckpointSaveError naming the writer's logged cause and the filesystem's free space."""
    from torch.distributed.checkpoint.api import CheckpointException

    errors, logger = _ErrorLog(), logging.getLogger("megatron.core.dist_checkpointing")
    logger.addHandler(errors)
    try:
        yield
    except (Exception, CheckpointException) as err:
        raise CheckpointSaveError(save_failure_message(ckpt, err, errors.messages)) from err
    finally:
        logger.removeHandler(errors)


def save_failure_message(ckpt: Path, err: BaseException, logged: List[str]) -> str:
    cause = "; ".join(dict.fromkeys(logged)) or f"{type(err).__name__}: {err}"
    usage = shutil.disk_usage(ckpt if ckpt.exists() else ckpt.parent)
    tracker = ckpt.parent / TRACKER
    intact = (f"{tracker} still points at {tracker.read_text().strip()}" if tracker.is_file()
              else "no earlier checkpoint in this directory")
    return (f"saving {ckpt} failed: {cause}. Its filesystem has {_gib(usage.free)} free of "
            f"{_gib(usage.total)}. {intact}; {ckpt.name} is incomplete (no complete manifest: "
            f"never loaded) and can be deleted")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def refusing_non_finite_weights(save_checkpoint):
    def save_checkpoint_of_finite_weights(iteration, model, *args, **kwargs):
        bad = non_finite_parameters(model)
        if _any_rank(bool(bad)):
            raise NonFiniteWeights(
                f"iteration {iteration}: the model's weights hold NaN/Inf ("
                + (f"{bad[0]}" + (f" and {len(bad) - 1} more on this rank" if len(bad) > 1 else "")
                   if bad else "on another rank")
                + "); not saving them, so the latest checkpoint stays the last good one. Resume "
                  "from it, e.g. with a lower learning rate or another data order")
        return save_checkpoint(iteration, model, *args, **kwargs)
    return save_checkpoint_of_finite_weights


def non_finite_parameters(model) -> List[str]:
    """Names of this rank's parameters holding NaN or Inf (one device sync in the good case)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    named = [(n, p) for chunk in chunks for n, p in chunk.named_parameters()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok]


def _any_rank(flag: bool) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
