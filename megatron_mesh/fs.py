"""Output directories that appear only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class OutputExistsError(ValueError):
    """The output directory exists, holds files, and replacing it was not asked for."""


def check_writable(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out}: exists and is not empty (use --force to replace it)")


@contextlib.contextmanager
def atomic_directory(out, force: bool = False) -> Iterator[Path]:
    """Yield a scratch directory beside ``out``; on success it replaces ``out`` in one rename.

    On any error the scratch directory is removed and ``out`` is left as it was, so an
    interrupted export or conversion never leaves a directory that looks complete.
    """
    out = Path(out)
    check_writable(out, force)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
