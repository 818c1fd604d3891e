"""The model and batch the tensor-parallel worker and its test share."""

import torch

from conftest import REPO


def tiny_section(scheme):
    """tiny-cpu.yml's model section with ``scheme``: hidden 64, 4 heads, vocab 4096, 1+2R2+1."""
    from megatron_mesh.config.yaml_file import load_config_tree

    return dict(load_config_tree(REPO / "configs" / "tiny-cpu.yml")[0]["model"], state_scheme=scheme)


def fixed_batch(config, batch=2, seq=32):
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    return tokens, torch.arange(seq).unsqueeze(0).expand(batch, seq)
