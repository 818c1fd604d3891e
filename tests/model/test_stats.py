"""Training FLOPs: the count from the config alone equals the count over the real model's
parameters, and follows megatron-core's convention (its own ``num_floating_point_operations`` on
Megatron's parsed arguments) with every core application of a loop counted."""


import pytest
import torch

from conftest import REPO, megatron_args, random_batch, tiny_config
from megatron_mesh.recurrence.schemes import SCHEME_NAMES, scheme_class

TINY = REPO / "configs/tiny-cpu.yml"

# Every registered looped scheme at 1+2R2+1 (from the registry: a new scheme is counted without
# a test edit), plus another depth and an untied layout.
LOOPED = [("1+2R2+1", name) for name in SCHEME_NAMES if scheme_class(name) is not None]
LAYOUTS = [("1+2R3+1", "base"), ("1+1+2+1", "mesh")]


LLAMA = dict(layer_family="llama", num_query_groups=2, ffn_hidden_size=96, tie_embeddings=True)
"""A llama-family shape: SwiGLU, grouped-query attention, tied embeddings."""


@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt_neox", "llama"])
@pytest.mark.parametrize("layout, scheme", [("3", "vanilla"), *LAYOUTS, *LOOPED])
def test_config_matmul_count_equals_the_built_model(megatron_world, layout, scheme, family):
    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.stats import applied_matmul_weights, applied_matmul_weights_of_config

    cfg = tiny_config(layout, scheme, perform_initialization=False, **family)
    with torch.device("meta"):
        model = MeshGPTModel(cfg)
    assert applied_matmul_weights(model) == applied_matmul_weights_of_config(cfg)


def megatron_flops(args, batch: int) -> float:
    """megatron-core's FLOPs of one global batch of full-length sequences."""
    from megatron.training.training import num_floating_point_operations

    return num_floating_point_operations(args, batch)


VANILLA = [
    # Pythia shapes: q = kv_channels * heads = hidden
    ("pythia-1.4b-24-vanilla.yml", (), (), {}),
    ("pythia-160m-12-vanilla.yml", (), (), {}),
    # q = 4 * 24 = 96 != hidden 64 (megatron_argv passes model.kv_channels on as --kv-channels)
    ("tiny-cpu.yml", ("model.layout=3", "model.state_scheme=vanilla", "model.kv_channels=24"),
     (), {}),
    # the llama family: SwiGLU (3 MLP matrices), GQA, no biases
    ("tiny-cpu.yml", ("model.layout=2", "model.state_scheme=vanilla", "model.layer_family=llama",
                      "model.num_query_groups=2", "model.ffn_hidden_size=96"), (), {}),
]


@pytest.mark.parametrize("name, overrides, passthrough, extra", VANILLA,
                         ids=["pythia-1.4b", "pythia-160m", "kv_channels", "llama-gqa"])
def test_vanilla_flops_equal_megatron_cores_count(name, overrides, passthrough, extra):
    """Fails for every case under the old convention (12 * s * h per layer, no causal half)."""
    from megatron_mesh.config.yaml_file import load_model_config
    from megatron_mesh.model.stats import train_flops_per_token

    args = megatron_args(REPO / "configs" / name, overrides, passthrough)
    cfg = load_model_config(REPO / "configs" / name, overrides, use_cpu_initialization=True, **extra)
    assert (args.num_layers, args.kv_channels, args.padded_vocab_size) == (
        cfg.num_layers, cfg.kv_channels, cfg.vocab_size)
    batch, s = 4, args.seq_length
    assert train_flops_per_token(cfg, s) * batch * s == megatron_flops(args, batch)


def forward_matmul_flops(cfg) -> int:
    """Matmul FLOPs of one forward of a batch of 8 tokens, counted by torch (FlopCounterMode:
    every mm, addmm, bmm, whichever module issues it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mesh.model.gpt import MeshGPTModel

    model = MeshGPTModel(cfg)
    tokens, positions = random_batch(cfg, batch=1, seq=8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, positions)
    return counter.get_total_flops()


def tiny_model_config(layout, scheme):
    from megatron_mesh.config.yaml_file import load_model_config

    overrides = (f"model.layout={layout}", f"model.state_scheme={scheme}")
    return load_model_config(TINY, overrides, use_cpu_initialization=True)


@pytest.mark.parametrize("layout, scheme", [*LAYOUTS, *LOOPED])
def test_looped_flops_are_vanilla_at_n_compute_plus_routers(megatron_world, layout, scheme):
    """Every core application counts as a layer of a vanilla model N_compute deep; the scheme
    adds its matmuls, nothing else. Those are measured, not read off the scheme: the forward's
    matmul FLOPs beyond the vanilla model's (same layers and attention, so only the scheme's
    routers, coefficient projections, adapters and readouts remain), per token and per
    multiply-add (2 FLOPs): a weight applied every loop step (mesh_shared's shared pair, an
    injection adapter) counts K times, one applied once (a per-step router) once."""
    from megatron_mesh.model.stats import train_flops_per_token

    cfg = tiny_model_config(layout, scheme)
    extra = forward_matmul_flops(cfg) - forward_matmul_flops(tiny_model_config(cfg.num_layers, "vanilla"))
    scheme_matmuls, rest = divmod(extra, 2 * 8)
    assert rest == 0 and scheme_matmuls >= 0
    vanilla = megatron_args(TINY, (f"model.layout={cfg.num_layers}", "model.state_scheme=vanilla"))
    batch, s = 2, vanilla.seq_length
    expected = megatron_flops(vanilla, batch) + 6 * scheme_matmuls * batch * s
    assert train_flops_per_token(cfg, s) * batch * s == expected
