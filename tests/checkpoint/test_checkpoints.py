"""Finding and verifying checkpoints (the tracker at its edges, a missing manifest) and loading
across layer specs: a TransformerEngine-style model loads a local-spec checkpoint."""

import dataclasses
import os
import shutil
from argparse import Namespace

import pytest
import torch

from conftest import random_batch, tiny_config


def te_style_spec():
    """The local spec whose final norm keeps extra state as TE's modules do (fp8 metadata in
    ``_extra_state``): what a TE model asks of a checkpoint that a local-spec one lacks."""
    from megatron_mesh.model.layers import SequenceParallelLayerNorm, local_block_spec

    class ExtraStateNorm(SequenceParallelLayerNorm):
        def get_extra_state(self):
            return torch.tensor([1.0])  # TE: serialized fp8 scaling state

        def set_extra_state(self, state):
            self.loaded_extra_state = state

    return dataclasses.replace(local_block_spec(), final_layernorm=ExtraStateNorm)


def load_error(request, ckpt) -> str:
    """The text of the error megatron's load raises (torch wraps the rank's error)."""
    from megatron.core import dist_checkpointing

    with pytest.raises(BaseException) as err:  # torch's CheckpointException is one
        dist_checkpointing.load(request, str(ckpt))
    return f"{err.value} {getattr(err.value, 'failures', '')}"


@pytest.fixture
def local_release(megatron_world, tmp_path):
    """(model, directory) of a local-spec checkpoint, as convert.py hf-to-megatron writes one."""
    from megatron.core import dist_checkpointing

    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config(), spec=local_block_spec())
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    checkpoint_manifest.write(tmp_path, rank=0, world_size=1)  # as the trainer and the importer do
    return model, tmp_path


def test_te_style_model_loads_a_local_spec_checkpoint(local_release):
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoint.paths import keep_missing_extra_state
    from megatron_mesh.model.gpt import MeshGPTModel

    local, ckpt = local_release
    te = MeshGPTModel(tiny_config(), spec=te_style_spec())
    error = load_error(te.sharded_state_dict(), ckpt)  # megatron-core as it is
    assert "Missing key in checkpoint state_dict: decoder.final_layernorm._extra_state" in error

    request = te.sharded_state_dict()
    assert keep_missing_extra_state(request, ckpt) == ["decoder.final_layernorm._extra_state"]
    te.load_state_dict(dist_checkpointing.load(request, str(ckpt)), strict=True)  # as megatron does
    assert torch.equal(te.decoder.final_layernorm.loaded_extra_state, torch.tensor([1.0]))  # its own
    tokens, positions = random_batch(te.config)
    assert torch.equal(te(tokens, positions), local(tokens, positions))


def test_only_extra_state_is_ever_kept(local_release):
    """A weight the checkpoint lacks still fails the load."""
    from megatron_mesh.checkpoint.paths import keep_missing_extra_state
    from megatron_mesh.model.gpt import MeshGPTModel

    _, ckpt = local_release
    deeper = MeshGPTModel(tiny_config("1+2R3+1", buffer_slots=5), spec=te_style_spec())  # + routers.3
    request = deeper.sharded_state_dict()
    keep_missing_extra_state(request, ckpt)
    assert "decoder.scheme.routers.3.write.linear.weight from model not in" in load_error(request, ckpt)


def test_trainer_loads_through_the_fix(local_release):
    """megatron.training's checkpoint loader (training/checkpointing.py) goes through it."""
    from megatron.training import checkpointing

    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.training import megatron_fixes

    _, ckpt = local_release
    megatron_fixes.apply_trainer()
    te = MeshGPTModel(tiny_config(), spec=te_style_spec())
    te.load_state_dict(checkpointing.dist_checkpointing.load(te.sharded_state_dict(), str(ckpt)))


def test_a_truncated_or_missing_file_is_named_with_the_newest_complete_iteration(local_release):
    """torch's reader meets a cut-short .distcp as a bare EOFError; the readers check first."""
    from megatron_mesh.checkpoint.paths import incomplete_files, verify
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.checkpoint.reader import load_checkpoint

    _, saved = local_release
    runs = saved / "run"
    for name in ("iter_0000004", "iter_0000008"):
        shutil.copytree(saved, runs / name, ignore=shutil.ignore_patterns("run"))
    latest = runs / "iter_0000008"
    assert incomplete_files(latest) == []
    data = sorted(latest.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{data}: truncated, [\d,]+ bytes of at least "
                                              rf".*iter_0000004 verifies: use 4"):
        verify(latest, "use {iteration}")
    with pytest.raises(CheckpointError, match=rf"{data}: truncated.*read .*iter_0000004 instead"):
        load_checkpoint(str(latest))
    data.unlink()
    with pytest.raises(CheckpointError, match=rf"{data}: missing \(listed in the checkpoint's "
                                              rf"metadata\).*iter_0000004 verifies"):
        verify(latest, "use {iteration}")


@pytest.fixture
def tracked_run(megatron_world, tmp_path):
    """A save directory as a run leaves it: iterations 4 and 8 (each with its manifest), the
    tracker at 8."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    for iteration in (4, 8):
        ckpt = tmp_path / f"iter_{iteration:07d}"
        ckpt.mkdir()
        state = {"w": ShardedTensor.from_rank_offsets("w", torch.full((4,), float(iteration)))}
        dist_checkpointing.save(state, str(ckpt))
        checkpoint_manifest.write(ckpt, rank=0, world_size=1)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("8")
    return tmp_path


def way_out(run, newest="8"):
    """What every tracker error ends with: the iterations, the newest intact one, the fixes."""
    return (f"iterations in {run}: 4, 8; the newest that verifies is iter_000000{newest}: write its "
            f"number to the tracker (`echo {newest} > {run}/latest_checkpointed_iteration.txt`)")


@pytest.mark.parametrize("text, problem", [
    ("", "'' is neither an iteration number nor 'release' (an empty file: the run was killed "
         "while megatron rewrote it)"),  # megatron truncates the tracker, then writes it
    ("abc", "'abc' is neither an iteration number nor 'release'"),
    ("-1", "'-1' is neither an iteration number nor 'release'"),
])
def test_an_unreadable_tracker_names_the_newest_intact_iteration_and_the_fix(tracked_run, text, problem):
    from megatron_mesh.checkpoint.paths import iteration_dir
    from megatron_mesh.errors import CheckpointError

    tracker = tracked_run / "latest_checkpointed_iteration.txt"
    tracker.write_text(text)
    with pytest.raises(CheckpointError) as err:
        iteration_dir(tracked_run)
    assert str(err.value) == (f"{tracker}: {problem}. {way_out(tracked_run)}, or read "
                              f"{tracked_run}/iter_0000008 instead")
    assert iteration_dir(tracked_run, 4) == tracked_run / "iter_0000004"  # an explicit iteration


def test_a_tracker_naming_a_missing_or_incomplete_iteration_names_the_newest_intact_one(tracked_run):
    from megatron_mesh.checkpoint.paths import iteration_dir
    from megatron_mesh.errors import CheckpointError

    tracker = tracked_run / "latest_checkpointed_iteration.txt"
    tracker.write_text("99")
    with pytest.raises(CheckpointError, match=rf"^{tracker} points at iter_0000099, but "
                                              rf"{tracked_run}/iter_0000099 does not exist\. "):
        iteration_dir(tracked_run)
    (tracked_run / "iter_0000008" / "metadata.json").unlink()  # megatron writes it last
    tracker.write_text("8")
    with pytest.raises(CheckpointError) as err:
        iteration_dir(tracked_run)
    assert str(err.value) == (
        f"{tracker} points at iter_0000008, but {tracked_run}/iter_0000008 has no metadata.json: "
        f"not a complete torch_dist checkpoint. {way_out(tracked_run, '4')}, or read "
        f"{tracked_run}/iter_0000004 instead")


def test_a_deleted_tracker_is_named_with_the_iterations_beside_it(tracked_run):
    from megatron_mesh.checkpoint.paths import iteration_dir
    from megatron_mesh.errors import CheckpointError

    (tracked_run / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        iteration_dir(tracked_run)
    assert str(err.value) == (
        f"{tracked_run}: no latest_checkpointed_iteration.txt beside its checkpoints (deleted, or "
        f"left out of a copy). {way_out(tracked_run)}, or read {tracked_run}/iter_0000008 instead")
    from megatron_mesh.evaluation.loading import load_model  # evaluate.py, probe.py: the same

    with pytest.raises(CheckpointError, match=r"no latest_checkpointed_iteration.txt beside its "
                                              r"checkpoints .*, or read .*/iter_0000008 instead$"):
        load_model(tracked_run)


def resume_args(load, ckpt_step=None, verify=True):
    return Namespace(load=str(load), ckpt_step=ckpt_step, rank=0, world_size=1,
                     mesh_skip_checkpoint_verification=not verify)


def test_the_trainer_refuses_a_load_directory_whose_tracker_is_gone(tracked_run, capsys):
    """megatron would start from iteration 0 and its saves would overwrite the old run."""
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.training.resume import checkpoint_to_load

    (tracked_run / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        checkpoint_to_load(resume_args(tracked_run))
    assert str(err.value) == (
        f"{tracked_run}: no latest_checkpointed_iteration.txt beside its checkpoints (deleted, or "
        f"left out of a copy): megatron would start from iteration 0 and its saves would overwrite "
        f"them. {way_out(tracked_run)}, or resume from it with `-- --ckpt-step 8`. To start a new "
        f"run instead, give it another checkpointing.save (or remove those directories)")
    # the fix it names: megatron loads --ckpt-step without a tracker, verified first
    assert checkpoint_to_load(resume_args(tracked_run, ckpt_step=8)) == tracked_run / "iter_0000008"
    # only unfinished saves (a run's first save killed half way): nothing to lose, a fresh start
    for name in ("iter_0000004", "iter_0000008"):
        (tracked_run / name / "metadata.json").unlink()
        (tracked_run / name / ".metadata").unlink()
    assert checkpoint_to_load(resume_args(tracked_run)) is None
    assert ("iteration directories (iter_0000004, iter_0000008) are unfinished saves (no complete "
            "torch_dist checkpoint): starting from iteration 0" in capsys.readouterr().out)


def test_the_trainer_names_only_the_tracker_fix_for_an_unreadable_tracker(tracked_run):
    """megatron reads the tracker even with --ckpt-step (and exits on '' with status 0)."""
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.training.resume import checkpoint_to_load

    (tracked_run / "latest_checkpointed_iteration.txt").write_text("")
    for step in (None, 4):
        with pytest.raises(CheckpointError) as err:
            checkpoint_to_load(resume_args(tracked_run, ckpt_step=step))
        assert str(err.value).endswith(way_out(tracked_run)), str(err.value)
    (tracked_run / "latest_checkpointed_iteration.txt").write_text("99")
    with pytest.raises(CheckpointError, match=r"points at iter_0000099.*`echo 8 > .*`\), or resume "
                                              r"from it with `-- --ckpt-step 8`$"):
        checkpoint_to_load(resume_args(tracked_run))
    assert checkpoint_to_load(resume_args(tracked_run, ckpt_step=4)) == tracked_run / "iter_0000004"


def test_the_trainer_writes_the_tracker_whole(tracked_run, monkeypatch):
    """megatron's save (training/checkpointing.py:1011) opens the tracker with 'w', truncating
    it, then writes: a kill in between left it empty. Through the fix it is written beside,
    fsync'ed and renamed over: a kill leaves the old tracker."""
    import inspect

    from megatron.core.msc_utils import MaybeMultiStorageClient
    from megatron.training import checkpointing

    from megatron_mesh.training import megatron_fixes

    assert "maybe_msc.open(tracker_filename, 'w')" in inspect.getsource(checkpointing.save_checkpoint)
    tracker = tracked_run / "latest_checkpointed_iteration.txt"

    def killed_while_writing(storage):
        with pytest.raises(KeyboardInterrupt):
            with storage.open(str(tracker), "w"):
                raise KeyboardInterrupt  # killed before megatron's f.write
        return tracker.read_text()

    assert killed_while_writing(MaybeMultiStorageClient()) == ""  # megatron's own writer
    tracker.write_text("8")
    monkeypatch.setattr(checkpointing, "maybe_msc", checkpointing.maybe_msc)  # undone afterwards
    megatron_fixes._write_the_tracker_whole()  # (apply_trainer's)
    assert killed_while_writing(checkpointing.maybe_msc) == "8"
    with checkpointing.maybe_msc.open(str(tracker), "w") as f:
        f.write("12")
    assert tracker.read_text() == "12"
    assert sorted(os.listdir(tracked_run)) == ["iter_0000004", "iter_0000008", tracker.name]
    with checkpointing.maybe_msc.open(str(tracked_run / "other.txt"), "w") as f:  # anything else: as before
        f.write("x")
    assert checkpointing.maybe_msc.os is os


def test_a_checkpoint_copied_without_its_manifest_is_refused_unless_verification_is_off(tracked_run):
    """A copy that left out manifest/ would load without any check of its contents."""
    from megatron_mesh.errors import CheckpointError
    from megatron_mesh.training.resume import check_resume_model

    latest = tracked_run / "iter_0000008"
    shutil.rmtree(latest / "manifest")
    with pytest.raises(CheckpointError) as err:
        check_resume_model(resume_args(tracked_run))
    assert str(err.value) == (
        f"{latest}: unverifiable checkpoint: {latest}/manifest: missing, so the contents of its "
        f"files cannot be checked (left out of a copy, or saved before megatron-mesh wrote "
        f"manifests, or by another tool). iter_0000004 verifies: resume from it with `-- --ckpt-step "
        f"4`. To load it unverified anyway: --set checkpointing.verify=false")
