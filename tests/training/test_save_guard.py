"""What every training save guarantees: a manifest per rank, named failures, no NaN weights."""

import builtins
import errno
import io
import os
import sys

import pytest
import torch

from conftest import tiny_config


@pytest.fixture
def model(megatron_world):
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    return MeshGPTModel(tiny_config())


def test_a_save_records_its_manifest_before_returning(model, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest
    from megatron_mesh.training.save_guard import recording_manifests

    recording_manifests(dist_checkpointing.save)(model.sharded_state_dict(), str(tmp_path))
    assert [p.name for p in (tmp_path / "manifest").iterdir()] == ["rank-00000-of-00001.json"]
    assert checkpoint_manifest.problems(tmp_path) == []


class FullDisk(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)


@pytest.mark.skipif((3, 12, 0) <= sys.version_info[:3] < (3, 12, 2),
                    reason="CPython 3.12.0-3.12.1 segfault collecting the failed write's BytesIO "
                           "buffer (python/cpython#111049, fixed in 3.12.2; README: support matrix)")
def test_a_full_disk_is_named_with_the_file_and_the_free_space(model, tmp_path, monkeypatch):
    """megatron's writer logs the OSError and raises 'Worker failure: <class 'OSError'>'."""
    from megatron.core import dist_checkpointing

    from megatron_mesh.training.save_guard import CheckpointSaveError, recording_manifests

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    ckpt = tmp_path / "iter_0000008"
    ckpt.mkdir()
    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith(".distcp") and "w" in mode:
            return FullDisk(file, "w")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    with pytest.raises(CheckpointSaveError) as err:
        recording_manifests(dist_checkpointing.save)(model.sharded_state_dict(), str(ckpt))
    message = str(err.value)
    assert f"saving {ckpt} failed: " in message
    assert f"No space left on device: '{ckpt}/__0_0.distcp'" in message
    assert "GiB free of" in message and "latest_checkpointed_iteration.txt still points at 4" in message
    assert not (ckpt / "manifest").exists()


def test_nan_weights_are_never_saved(model):
    from megatron_mesh.training.save_guard import NonFiniteWeights, refusing_non_finite_weights

    saved = []
    save = refusing_non_finite_weights(lambda iteration, model, *a, **k: saved.append(iteration))
    save(10, [model], None)
    with torch.no_grad():
        model.decoder.scheme.routers[0].write.linear.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"iteration 20: the model's weights hold NaN/Inf "
                                               r"\(decoder\.scheme\.routers\.0\.write\.linear\.weight\)"):
        save(20, [model], None)
    assert saved == [10]
