"""Reading a checkpoint runs no code from it: pickles planted as torch's .metadata, as the common
state inside a .distcp or as a common.pt, with the integrity manifest regenerated over them or
not, are refused by every reader (convert.py and evaluate.py's library functions, megatron's own
loads as the trainer patches them, the trainer's resume) naming the file and the global; real
checkpoints still load."""

import io
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from conftest import REPO
from trainer import ckpt_overrides, command, env, train

SECTION = dict(layout="1+2R2+1", state_scheme="mesh", hidden_size=64, num_attention_heads=4,
               vocab_size=96, max_sequence_length=64)
COMMON = "common_state/shard_0_1"


def config():
    """SECTION's model, built on the CPU as a converted checkpoint's is (checkpoint.reader.build_model)."""
    from megatron_mesh.config.model import MeshConfig

    return MeshConfig.from_section(SECTION, use_cpu_initialization=True)


class RunsCode:
    """Unpickling this runs ``touch marker`` (os.system: the global posix.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def trusted_metadata(ckpt):
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own checkpoint


def plant_metadata(ckpt, marker) -> None:
    """.metadata as it was plus an attribute that runs code: the checkpoint loads as before."""
    metadata = trusted_metadata(ckpt)
    metadata.planted = RunsCode(marker)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def plant_item(ckpt, marker, key=COMMON) -> None:
    """The item ``key`` (a torch.save'd list in a .distcp) with one more element that runs
    code, appended to its data file and pointed at by a rewritten .metadata."""
    metadata = trusted_metadata(ckpt)
    item = next(s for i, s in metadata.storage_data.items() if i.fqn == key)
    path = ckpt / item.relative_path
    with open(path, "rb") as f:
        f.seek(item.offset)
        saved = torch.load(io.BytesIO(f.read(item.length)), weights_only=False)
    saved.append(RunsCode(marker))
    payload = io.BytesIO()
    torch.save(saved, payload)
    item.offset, item.length = path.stat().st_size, len(payload.getvalue())
    with open(path, "ab") as f:
        f.write(payload.getvalue())
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def regenerate_manifest(ckpt) -> None:
    from megatron_mesh.checkpoint import manifest as checkpoint_manifest

    shutil.rmtree(ckpt / "manifest")
    checkpoint_manifest.write(ckpt, rank=0, world_size=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory, megatron_world):
    """A tiny release checkpoint (convert.py hf-to-megatron's kind: model, args, manifest)."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint

    out = tmp_path_factory.mktemp("unpickle") / "ckpt"
    return save_release_checkpoint(build_model(config(), {}, ("",), 0), checkpoint_args(config(), None), out)


@pytest.fixture
def copy(release, tmp_path):
    """(save directory, iteration directory, marker) of a fresh copy of ``release``."""
    shutil.copytree(release, tmp_path / "ckpt")
    return tmp_path / "ckpt", tmp_path / "ckpt" / "release", tmp_path / "ran"


def refused(source, name="posix.system"):
    """The refusal's text, as a pattern for pytest.raises(match=...)."""
    return re.escape(f"refusing to unpickle {name} from {source}: not an allowed checkpoint type")


def test_the_unpickler_admits_a_save_and_refuses_before_importing(release, tmp_path, monkeypatch):
    from megatron_mesh.checkpoint.unpickle import RefusedPickleError, load_object, unpickle_metadata

    with open(release / "release" / ".metadata", "rb") as f:
        assert unpickle_metadata(f, "x").state_dict_metadata  # what a real save holds
    (tmp_path / "planted_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RefusedPickleError, match=refused("x", "planted_module.f")):
        unpickle_metadata(io.BytesIO(b"cplanted_module\nf\n."), "x")  # GLOBAL planted_module.f
    assert not (tmp_path / "imported").exists() and "planted_module" not in sys.modules

    common = {"args": Namespace(params_dtype=torch.bfloat16), "rng": torch.ByteTensor([1, 2]),
              "iteration": 4}
    buffer = io.BytesIO()
    torch.save([common], buffer)
    buffer.seek(0)
    assert str(load_object(buffer, "y")) == str([common])
    torch.save(RunsCode(tmp_path / "ran"), buffer := io.BytesIO())
    buffer.seek(0)
    with pytest.raises(RefusedPickleError, match=refused("y")):
        load_object(buffer, "y")
    # protocol 4's STACK_GLOBAL, which the listing of globals cannot follow: torch's rules stop it
    torch.save(RunsCode(tmp_path / "ran"), buffer := io.BytesIO(), pickle_protocol=4)
    buffer.seek(0)
    with pytest.raises(RefusedPickleError, match="refusing to unpickle it from y: torch's "
                                                 "weights_only unpickler: Unsupported operand"):
        load_object(buffer, "y")
    assert not (tmp_path / "ran").exists()


def export(save_dir, verify_hashes=True):
    from megatron_mesh.hf.export import export

    return export(str(save_dir), str(save_dir.parent / "hf"), verify_hashes=verify_hashes)


def load_model(save_dir, verify_hashes=True):
    from megatron_mesh.evaluation.loading import load_model

    return load_model(save_dir, verify_hashes=verify_hashes)


@pytest.mark.parametrize("reader", [export, load_model], ids=["convert", "evaluate"])
@pytest.mark.parametrize("regenerate", [False, True], ids=["manifest-kept", "manifest-regenerated"])
def test_planted_metadata_is_refused(copy, reader, regenerate):
    """Before the fix the code ran even with the manifest kept: verifying reads .metadata."""
    from megatron_mesh.errors import CheckpointError

    save_dir, ckpt, marker = copy
    plant_metadata(ckpt, marker)
    if regenerate:
        regenerate_manifest(ckpt)
    with pytest.raises(CheckpointError, match=refused(ckpt / ".metadata")):
        reader(save_dir)
    with pytest.raises(CheckpointError, match=refused(ckpt / ".metadata")):
        reader(save_dir, verify_hashes=False)  # no flag skips it
    assert not marker.exists()


@pytest.mark.parametrize("reader", [export, load_model], ids=["convert", "evaluate"])
def test_planted_common_state_is_refused(copy, reader):
    from megatron_mesh.errors import CheckpointError

    save_dir, ckpt, marker = copy
    plant_item(ckpt, marker)
    with pytest.raises(CheckpointError, match="the manifest records"):
        reader(save_dir)  # the manifest kept: the hash check stops it first
    source = f"{ckpt / '__0_0.distcp'} (item {COMMON})"
    with pytest.raises(CheckpointError, match=refused(source)):
        reader(save_dir, verify_hashes=False)
    regenerate_manifest(ckpt)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp \(item common_state"):
        reader(save_dir)
    assert not marker.exists()


def test_a_real_checkpoint_still_loads(copy, release):
    from megatron_mesh.checkpoint.reader import load_checkpoint

    save_dir, _, _ = copy
    state, common = load_checkpoint(str(save_dir))
    assert common["args"].mesh_model and state
    assert (export(save_dir) / "config.json").is_file()
    assert load_model(save_dir).config.layout == SECTION["layout"]


def test_megatron_loads_by_the_allowlist_once_the_trainer_applies_it(copy, megatron_world,
                                                                     monkeypatch):
    """What tools/pretrain_mesh.py runs (megatron_fixes.apply_trainer): megatron's loads with
    torch's reader and planner patched; undone afterwards, so that other tests meet megatron
    as it is."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.unpickle import RefusedPickleError
    from megatron_mesh.training import megatron_fixes

    for owner, name in [(FileSystemReader, "read_metadata"), (FileSystemReader, "read_data"),
                        (DefaultLoadPlanner, "load_bytes"), (serialization, "load_common"),
                        (dist_checkpointing, "load"), (dist_checkpointing, "load_common_state_dict")]:
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored at teardown
    megatron_fixes._unpickle_checkpoints_by_the_allowlist()
    save_dir, ckpt, marker = copy
    request = {"model": build_model(config(), {}, ("",), 0).sharded_state_dict()}
    assert dist_checkpointing.load(request, str(ckpt))["model"]  # a real checkpoint loads
    assert dist_checkpointing.load_common_state_dict(str(ckpt))["args"].mesh_model

    plant_item(ckpt, marker)
    for load in (lambda: dist_checkpointing.load_common_state_dict(str(ckpt)),
                 lambda: dist_checkpointing.load(request, str(ckpt))):
        with pytest.raises(RefusedPickleError, match=r"__0_0\.distcp \(item common_state"):
            load()
    plant_metadata(ckpt, marker)
    with pytest.raises(RefusedPickleError, match=refused(ckpt / ".metadata")):
        FileSystemReader(str(ckpt)).read_metadata()
    # an older save's common.pt, which megatron prefers wherever one exists
    torch.save({"args": RunsCode(marker)}, ckpt / "common.pt")
    with pytest.raises(RefusedPickleError, match=refused(ckpt / "common.pt")):
        dist_checkpointing.load_common_state_dict(str(ckpt))
    assert not marker.exists()


@pytest.mark.slow
def test_a_trainer_save_loads_and_a_planted_resume_stops(tmp_path):
    """Every pickle of a real trainer save (optimizer, RNG, rerun state, args) passes the
    allowlist; a resume from it with a planted RNG state (manifest regenerated), which only
    megatron's own load_checkpoint reads, stops with the refusal, the code not run."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_mesh.checkpoint import unpickle as checkpoint_unpickle

    run = {"training.train_iters": 4, "parallelism.distributed_optimizer": True}
    train(tmp_path, ckpt_overrides(tmp_path / "ckpt", **run, **{"training.exit_interval": 2}))
    saved = tmp_path / "ckpt" / "iter_0000002"
    metadata = checkpoint_unpickle.metadata_of(saved)
    for index, item in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            with open(saved / item.relative_path, "rb") as f:
                f.seek(item.offset)
                checkpoint_unpickle.load_object(io.BytesIO(f.read(item.length)), index.fqn)
    rng = next(i.fqn for i in metadata.storage_data if i.fqn.startswith("rng_state"))
    plant_item(saved, tmp_path / "ran", rng)
    regenerate_manifest(saved)
    resume = command(tmp_path, ckpt_overrides(tmp_path / "ckpt", **run, **{"training.exit_interval": 3}))
    out = subprocess.run(resume, capture_output=True, text=True, cwd=REPO, env=env(), timeout=400)
    assert out.returncode != 0 and not (tmp_path / "ran").exists()
    assert re.search(refused(f"{saved / '__0_0.distcp'} (item {rng})"), out.stderr), out.stderr[-3000:]
