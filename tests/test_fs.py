"""Output directories that appear only when complete, and what a killed writer leaves behind."""

import os
import subprocess
import sys

import pytest

from megatron_mesh.fs import OutputExistsError, atomic_directory


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_replace_keeps_the_old_output_until_the_new_one_is_in(tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        with atomic_directory(out):
            pass
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # nothing is removed while the new one is written
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [b.name for _, b in renames][-2:] == [f".export.old{os.getpid()}", "export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_leftovers_of_a_killed_writer_are_removed_or_put_back(tmp_path):
    out, pid = tmp_path / "export", dead_pid()
    (tmp_path / f".export.tmp{pid}").mkdir()  # killed while writing
    old = tmp_path / f".export.old{pid}"  # killed between its two renames
    old.mkdir()
    (old / "model.safetensors").write_text("weights")
    live = tmp_path / f".export.tmp{os.getppid()}"  # another writer still at work
    live.mkdir()
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]


def test_an_output_set_aside_goes_back_when_nothing_replaced_it(tmp_path):
    from megatron_mesh.fs import clean_leftovers

    out, pid = tmp_path / "export", dead_pid()
    old = tmp_path / f".export.old{pid}"
    old.mkdir()
    (old / "model.safetensors").write_text("weights")
    clean_leftovers(out)
    assert (out / "model.safetensors").read_text() == "weights" and not old.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_of_an_output_honours_the_umask(tmp_path, umask):
    """A writer that renames a temporary file into place (safetensors >= 0.8: model.safetensors)
    left 0600 beside the umask's 0644 of every other file."""
    import tempfile

    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "config.json").write_text("{}")
            handle, name = tempfile.mkstemp(dir=tmp)  # 0600, as NamedTempFile
            os.close(handle)
            os.replace(name, tmp / "model.safetensors")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "sub" / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").rglob("*")}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask,
                     "sub": 0o777 & ~umask, "run.sh": 0o777 & ~umask}
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask
