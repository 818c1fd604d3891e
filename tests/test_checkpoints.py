"""Checkpoints across layer specs: a TransformerEngine-style model loads a local-spec checkpoint."""

import dataclasses

import pytest
import torch

from conftest import random_batch, tiny_config


def te_style_spec():
    """The local spec whose final norm keeps extra state as TE's modules do (fp8 metadata in
    ``_extra_state``): what a TE model asks of a checkpoint that a local-spec one lacks."""
    from megatron_mesh.layers import SequenceParallelLayerNorm, local_block_spec

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

    from megatron_mesh.layers import local_block_spec
    from megatron_mesh.model import MeshGPTModel

    torch.manual_seed(0)
    model = MeshGPTModel(tiny_config(), spec=local_block_spec())
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    return model, tmp_path


def test_te_style_model_loads_a_local_spec_checkpoint(local_release):
    from megatron.core import dist_checkpointing

    from megatron_mesh.checkpoints import keep_missing_extra_state
    from megatron_mesh.model import MeshGPTModel

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
    from megatron_mesh.checkpoints import keep_missing_extra_state
    from megatron_mesh.model import MeshGPTModel

    _, ckpt = local_release
    deeper = MeshGPTModel(tiny_config("1+2R3+1", buffer_slots=5), spec=te_style_spec())  # + routers.3
    request = deeper.sharded_state_dict()
    keep_missing_extra_state(request, ckpt)
    assert "decoder.scheme.routers.3.write.linear.weight from model not in" in load_error(request, ckpt)


def test_trainer_loads_through_the_fix(local_release):
    """megatron.training's checkpoint loader (training/checkpointing.py) goes through it."""
    from megatron.training import checkpointing

    from megatron_mesh.compat import megatron_fixes
    from megatron_mesh.model import MeshGPTModel

    _, ckpt = local_release
    megatron_fixes.apply_trainer()
    te = MeshGPTModel(tiny_config(), spec=te_style_spec())
    te.load_state_dict(checkpointing.dist_checkpointing.load(te.sharded_state_dict(), str(ckpt)))


def test_a_truncated_or_missing_file_is_named_with_the_newest_complete_iteration(local_release):
    """torch's reader meets a cut-short .distcp as a bare EOFError; the readers check first."""
    import shutil

    from megatron_mesh.checkpoints import CheckpointError, incomplete_files, verify
    from megatron_mesh.checkpoint_reader import load_checkpoint

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
