"""Integrity manifests: written per rank after a save, checked by every reader before loading."""

import json
import shutil

import pytest
import torch

from conftest import tiny_config


@pytest.fixture
def saved_run(megatron_world, tmp_path):
    """A save directory with two iterations of one model, each with its manifest."""
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest
    from megatron_mesh.model.gpt import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config())
    for name in ("iter_0000004", "iter_0000008"):
        (tmp_path / name).mkdir()
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path / name))
        checkpoint_manifest.write(tmp_path / name, rank=0, world_size=1)
    return tmp_path


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_changed_byte_is_named_with_both_hashes_and_the_newest_verifying_iteration(saved_run):
    from megatron_mesh.checkpoint.paths import verify
    from megatron_mesh.errors import CheckpointError

    latest = saved_run / "iter_0000008"
    verify(latest, "")  # intact: nothing to say
    data = latest / "__0_0.distcp"
    overwrite(data, data.stat().st_size // 2, b"\xff" * 256)  # same size, other contents
    with pytest.raises(CheckpointError, match=rf"{data}: xxh3_128 [0-9a-f]{{32}}, the manifest "
                                              rf"records [0-9a-f]{{32}} .*iter_0000004 verifies: "
                                              rf"use 4. To load it unverified anyway: --skip"):
        verify(latest, "use {iteration}", "--skip")
    verify(latest, "", hashes=False)  # skipped on request: sizes only


def test_every_share_is_checked_once(saved_run):
    """N readers (the ranks of a resume) each hash their share; together they cover all files."""
    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    latest = saved_run / "iter_0000008"
    names = sorted(json.loads(next((latest / "manifest").glob("*.json")).read_text())["files"])
    assert ".metadata" in names and "__0_0.distcp" in names
    for name in names:
        target = latest / name
        original = target.read_bytes()
        overwrite(target, 0, bytes([original[0] ^ 1]))
        flagged = [i for i in range(3) if checkpoint_manifest.problems(latest, share=(i, 3))]
        # torch's .metadata is read by every reader (which files exist), hashed by one
        assert len(flagged) == (3 if name == ".metadata" else 1), (name, flagged)
        target.write_bytes(original)


def test_missing_rank_manifest_and_unrecorded_files_are_named(saved_run):
    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    latest = saved_run / "iter_0000008"
    manifest = latest / "manifest" / "rank-00000-of-00001.json"
    shutil.copy(manifest, latest / "manifest" / "rank-00000-of-00002.json")  # a 2-rank save's half
    (latest / "manifest" / "rank-00000-of-00002.json").write_text(
        manifest.read_text().replace('"world_size": 1', '"world_size": 2'))
    manifest.unlink()
    assert checkpoint_manifest.problems(latest) == [
        f"{latest}/manifest/rank-00001-of-00002.json: missing (the save of rank 1 did not finish)"]

    record = json.loads((latest / "manifest" / "rank-00000-of-00002.json").read_text())
    del record["files"]["__0_0.distcp"]
    (latest / "manifest" / "rank-00000-of-00002.json").write_text(json.dumps(record))
    assert (f"{latest}/__0_0.distcp: listed in the checkpoint's metadata but in no rank's manifest"
            in checkpoint_manifest.problems(latest))
    (latest / "manifest" / "rank-00000-of-00002.json").write_text("{not json")
    with pytest.raises(checkpoint_manifest.ManifestError, match="rank-00000-of-00002.json: not a "
                                                                "checkpoint manifest"):
        checkpoint_manifest.problems(latest)


def test_a_checkpoint_without_manifest_is_refused_unless_the_hashes_are_skipped(saved_run):
    """A copy that left out manifest/ would load unchecked: flipped bytes would train on."""
    from megatron_mesh.checkpoint.paths import verify
    from megatron_mesh.errors import CheckpointError

    latest = saved_run / "iter_0000008"
    shutil.rmtree(latest / "manifest")
    with pytest.raises(CheckpointError, match=rf"^{latest}: unverifiable checkpoint: {latest}/manifest: "
                                              rf"missing, so the contents of its files cannot be "
                                              rf"checked .*iter_0000004 verifies: use 4\. To load it "
                                              rf"unverified anyway: --skip$"):
        verify(latest, "use {iteration}", "--skip")
    verify(latest, "", hashes=False)  # the opt-out: sizes only
    data = latest / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])  # sizes are still checked, and never skipped
    with pytest.raises(CheckpointError, match=rf"{data}: truncated.*iter_0000004 verifies") as err:
        verify(latest, "use {iteration}", "--skip", hashes=False)
    assert "unverified" not in str(err.value)


def test_a_save_into_an_interrupted_iteration_directory_starts_clean(saved_run, monkeypatch):
    """A 2-rank save of iteration 8 wrote its manifests, then the run died before the tracker
    moved; resumed on 1 rank, the run saves iteration 8 again into that directory. megatron
    saves over what is there (serialization.py:420 warns), so the old save's manifests stayed
    and every reader rejected the new, valid save."""
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.training import megatron_fixes

    latest = saved_run / "iter_0000008"
    record = json.loads((latest / "manifest" / "rank-00000-of-00001.json").read_text())
    for rank in (0, 1):
        (latest / "manifest" / f"rank-{rank:05d}-of-00002.json").write_text(
            json.dumps({**record, "rank": rank, "world_size": 2}))

    def save_again():
        torch.manual_seed(1)
        dist_checkpointing.save(MeshGPTModel(tiny_config()).sharded_state_dict(), str(latest))
        checkpoint_manifest.write(latest, rank=0, world_size=1)  # as save_guard does after it
        return checkpoint_manifest.problems(latest)

    if not getattr(dist_checkpointing.save, "_mesh_wraps", None):  # megatron's own save
        assert f"{latest}/manifest: manifests of different saves (world sizes [1, 2])" in save_again()
    monkeypatch.setattr(dist_checkpointing, "save", dist_checkpointing.save)  # undone afterwards
    megatron_fixes._start_each_save_clean()  # (apply_trainer's)
    assert save_again() == []
    assert [p.name for p in (latest / "manifest").iterdir()] == ["rank-00000-of-00001.json"]


def test_hf_to_megatron_writes_a_manifest(tmp_path, megatron_world):
    """A converted (release) checkpoint verifies like a trained one."""
    from megatron_mesh.checkpoint import manifest as checkpoint_manifest
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.model.gpt import MeshGPTModel

    section = {"layout": "1+2R2+1", "state_scheme": "mesh", "hidden_size": 64,
               "num_attention_heads": 4, "vocab_size": 96, "max_sequence_length": 32}
    config = MeshConfig.from_section(section, use_cpu_initialization=True)
    out = save_release_checkpoint(MeshGPTModel(config), checkpoint_args(config, None), tmp_path / "ckpt")
    assert checkpoint_manifest.problems(out / "release") == []
