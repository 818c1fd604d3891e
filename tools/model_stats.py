#!/usr/bin/env python
"""Parameter counts and training FLOPs per token of a config's model, built on the meta device.

    python tools/model_stats.py --config configs/pythia-1.4b-4+8R2+4-mesh.yml [--json]

No memory is allocated for weights and no GPU is needed. ``router`` counts the parameters of the
state scheme (MeSH routers, or the E.2 combination coefficients).

Training FLOPs per token follow megatron-core's convention (``megatron_mesh.model.stats``: 3 x forward,
core attention halved for the causal mask, every core application counted, routers included),
the number the trainer's TFLOP/s and MFU use. For a vanilla layout megatron-core's own
``num_floating_point_operations`` is printed beside it; the two are equal.
"""

import argparse
import json
from typing import Optional

from _bootstrap import cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.buffer_slots=6")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length for the attention FLOPs (default: model.max_sequence_length)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def load_config(config_path, overrides=()):
    """The config's MeshConfig, with CPU initialisation: otherwise megatron/TE would allocate on
    the GPU despite the meta device."""
    from megatron_mesh.config.yaml_file import load_model_config

    return load_model_config(
        config_path, overrides, perform_initialization=False, use_cpu_initialization=True
    )


def stats_of(cfg, seq_length=None):
    """``model_stats`` of the model built on the meta device with the local spec (the parameter
    shapes are the same under every spec)."""
    import torch

    from megatron_mesh.model.gpt import MeshGPTModel
    from megatron_mesh.model.layers import local_block_spec
    from megatron_mesh.model.stats import model_stats
    from megatron_mesh.parallel.process_groups import initialize_single_process

    initialize_single_process()
    with torch.device("meta"):
        model = MeshGPTModel(cfg, spec=local_block_spec())
    return model_stats(model, seq_length or cfg.max_sequence_length)


def build_stats(config_path, overrides=(), seq_length=None):
    """``stats_of`` a config file (with ``--set`` overrides)."""
    return stats_of(load_config(config_path, overrides), seq_length)


def megatron_flops_per_token(cfg, seq_length: int) -> Optional[float]:
    """megatron-core's own count (``num_floating_point_operations`` on its parsed arguments) for
    a vanilla layout, None for a looped one (which megatron does not model). Only the shape flags
    are given (SwiGLU for the llama family); every other argument keeps Megatron's default, which
    is what our runs use (no MoE, MTP, MLA or linear attention)."""
    if cfg.parsed_layout.recursive:
        return None
    from megatron.training.arguments import add_megatron_arguments
    from megatron.training.training import num_floating_point_operations

    flags = {"num-layers": cfg.num_layers, "hidden-size": cfg.hidden_size,
             "ffn-hidden-size": cfg.ffn_hidden_size, "num-attention-heads": cfg.num_attention_heads,
             "kv-channels": cfg.kv_channels, "seq-length": seq_length,
             "padded-vocab-size": cfg.vocab_size}
    argv = [f"--{name}={value}" for name, value in flags.items()]
    if cfg.gated_linear_unit:
        argv.append("--swiglu")
    if cfg.num_query_groups != cfg.num_attention_heads:
        argv += ["--group-query-attention", f"--num-query-groups={cfg.num_query_groups}"]
    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv)
    return num_floating_point_operations(args, batch_size=1) / seq_length


def flops_rows(cfg, stats) -> list:
    """The FLOP rows: the convention, ours, and megatron-core's for a vanilla layout."""
    from megatron_mesh.recurrence.loop_depth import EXPECTED_DRAWS

    convention = "megatron-core's (causal attention halved), every core application counted"
    rows = [("FLOP convention", convention)]
    mean = stats.loop_depth
    if mean is not None:  # the FLOPs are the mean over the depth distribution
        rows.append(("loop depth (training)", f"{cfg.loop_depth}: mean {mean.num_loops:.2f} steps, "
                     f"{mean.backprop_loops:.2f} with gradients (over {EXPECTED_DRAWS:,} draws)"))
    per_token = "training FLOPs/token" if mean is None else "expected training FLOPs/token"
    rows.append((f"{per_token} (seq {stats.seq_length})", f"{stats.train_flops_per_token:.4e}"))
    theirs = megatron_flops_per_token(cfg, stats.seq_length)
    if theirs is not None:
        same = "equal" if theirs == stats.train_flops_per_token else "DIFFERS from ours"
        rows.append(("megatron-core FLOPs/token", f"{theirs:.4e} ({same})"))
    return rows


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    cfg = load_config(args.config, args.overrides)
    stats = stats_of(cfg, args.seq_length)
    if args.json:
        theirs = megatron_flops_per_token(cfg, stats.seq_length)
        print(json.dumps(dict(stats.as_dict(), megatron_train_flops_per_token=theirs)))
        return
    rows = [
        ("config", args.config),
        ("layout", f"{stats.layout} ({stats.state_scheme})"),
        ("N_compute (unrolled layers)", stats.n_compute),
        ("unique layers", stats.unique_layers),
        ("total parameters", f"{stats.total_params:,}"),
        ("embedding parameters", f"{stats.embedding_params:,}"),
        ("non-embedding parameters", f"{stats.non_embedding_params:,}"),
        ("scheme parameters", f"{stats.router_params:,}"),  # routers, adapters, coefficients
        *flops_rows(cfg, stats),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
