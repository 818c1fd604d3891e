"""Output directories that appear only when complete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from megatron_mesh.errors import MeshError


class OutputExistsError(MeshError, ValueError):
    """The output directory exists, holds files, and replacing it was not asked for."""


def check_writable(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out}: exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out, force: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside ``out``; on success it replaces ``out`` by renames.

    On any error the scratch directory is removed and ``out`` is left as it was, so an
    interrupted export or conversion never leaves a directory that looks complete. A replaced
    ``out`` is renamed aside before the new one is renamed in and deleted only after, so a
    crash in between loses neither; what a killed process left beside ``out`` (its scratch
    directory, or an old output set aside) is cleaned up, or put back, by the next call.
    """
    out = Path(out)
    clean_leftovers(out)
    check_writable(out, force)
    tmp = _beside(out, "tmp", os.getpid())
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    honour_umask(tmp)
    old = _beside(out, "old", os.getpid())
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def honour_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the mode a plain open() or mkdir() gives a new
    one: 0666 (directories and executables 0777) less the umask. Writers that write a temporary
    file and rename it leave 0600 whatever the umask (safetensors >= 0.8 writes model.safetensors
    through tempfile's NamedTempFile), so colleagues on a shared cluster could not read an
    export whose other files they can."""
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        full = 0o777 if path.is_dir() or path.stat().st_mode & 0o111 else 0o666
        path.chmod(full & ~mask)


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _beside(out: Path, kind: str, pid: int) -> Path:
    return out.with_name(f".{out.name}.{kind}{pid}")


def clean_leftovers(out) -> None:
    """Remove the scratch directories of dead processes beside ``out``; an old output one set
    aside goes back to ``out`` when no new one took its place (the process died in between)."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)(\d+)")
    for path in sorted(out.parent.glob(f".{out.name}.*")) if out.parent.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match[2])):
            continue
        if match[1] == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
