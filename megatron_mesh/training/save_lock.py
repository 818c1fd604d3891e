"""One training run per save directory: the first rank holds a lock on it for the whole run.

Two runs started on one save directory (a requeued job whose first copy is still alive, a typo
in a second experiment) would both train to the end and write the same checkpoint files at the
same time. ``flock`` locks are released by the kernel when the holding process dies, however it
dies, so a killed run never leaves a stale lock behind; the file keeps who holds it, for the
error message. A filesystem that refuses locks gets a warning, not a refused run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from megatron_mesh.errors import MeshError

LOCK_FILE = ".megatron-mesh.lock"


class SaveDirectoryBusy(MeshError, RuntimeError):
    """Another live process holds the save directory's lock."""


@contextlib.contextmanager
def exclusive_save_directory(save_dir) -> Iterator[None]:
    """Hold ``save_dir``'s lock while the block runs; SaveDirectoryBusy if another process does."""
    path = Path(save_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _lock(fd, path, save_dir):
            os.ftruncate(fd, 0)
            os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path, save_dir) -> bool:
    """True once locked; False (with a warning) where the filesystem refuses locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = path.read_text().strip() or "another process"
        raise SaveDirectoryBusy(
            f"{save_dir}: already used by a running training run ({holder}); two runs "
            f"writing one save directory overwrite each other's checkpoints. Stop that run, "
            f"or give this one another checkpointing.save") from None
    except OSError as err:  # e.g. ENOSYS: Lustre mounted without -o flock
        print(f"[mesh] warning: {path}: the filesystem refuses locks ({err.strerror}): nothing "
              f"stops a second run on this save directory (on Lustre, mount with -o flock)",
              file=sys.stderr, flush=True)
        return False
