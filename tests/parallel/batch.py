"""The model and batch the tensor-parallel worker and its test share."""

import torch

from conftest import REPO


def tiny_section(scheme):
    """tiny-cpu.yml's model section with ``scheme``: hidden 64, 4 heads, vocab 4096, 1+2R2+1."""
    from megatron_mesh.config.yaml_file import load_config_tree

    return dict(load_config_tree(REPO / "configs" / "tiny-cpu.yml")[0]["model"], state_scheme=scheme)


def release_checkpoint(tmp_path_factory, name, section, seed=5):
    """A release checkpoint (a run's ``checkpointing.pretrained``) of a random model of the
    model section ``section``, under a fresh temporary directory ``name``."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.checkpoint.writer import checkpoint_args, save_release_checkpoint
    from megatron_mesh.config.model import MeshConfig

    config = MeshConfig.from_section(section)
    out = tmp_path_factory.mktemp(name) / "ckpt"
    save_release_checkpoint(build_model(config, {}, ("",), seed=seed), checkpoint_args(config, None), out)
    return out


def fixed_batch(config, batch=2, seq=32):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    return tokens, torch.arange(seq).unsqueeze(0).expand(batch, seq)
