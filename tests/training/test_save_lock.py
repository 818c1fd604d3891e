"""One training run per save directory."""

import subprocess
import sys

import pytest

from conftest import REPO
from megatron_mesh.training.save_lock import SaveDirectoryBusy, exclusive_save_directory


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    with exclusive_save_directory(tmp_path / "ckpt"):
        with pytest.raises(SaveDirectoryBusy, match=r"ckpt: already used by a running training "
                                                     r"run \(host .*, pid \d+, since "):
            with exclusive_save_directory(tmp_path / "ckpt"):
                pass
    with exclusive_save_directory(tmp_path / "ckpt"):  # released with the first run
        pass


def test_a_filesystem_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with exclusive_save_directory(tmp_path / "ckpt"):
        pass
    assert "the filesystem refuses locks (Function not implemented)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from megatron_mesh.training.save_lock import exclusive_save_directory as lock;"
         "ctx = lock(sys.argv[2]); ctx.__enter__(); print('held', flush=True); time.sleep(60)",
         str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SaveDirectoryBusy, match=f"pid {holder.pid}"):
        with exclusive_save_directory(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with exclusive_save_directory(tmp_path):
        pass


@pytest.mark.slow
def test_trainer_refuses_a_save_directory_in_use(tmp_path):
    from trainer import ckpt_overrides, command, env

    with exclusive_save_directory(tmp_path / "ckpt"):
        out = subprocess.run(command(tmp_path, ckpt_overrides(tmp_path / "ckpt")), capture_output=True,
                             text=True, cwd=REPO, env=env(), timeout=300)
    assert out.returncode != 0
    assert f"error: {tmp_path / 'ckpt'}: already used by a running training run" in out.stderr
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
