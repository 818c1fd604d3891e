#!/usr/bin/env python
"""Parameter counts and training FLOPs per token of a config's model, built on the meta device.

    python tools/model_stats.py --config configs/pythia-1.4b-4+8R2+4-mesh.yml [--json]

No memory is allocated for weights and no GPU is needed. ``router`` counts the parameters of the
state scheme (MeSH routers, or the E.2 combination coefficients).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron_mesh  # noqa: E402,F401  (CPU shims before megatron.core)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.buffer_slots=6")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length for the attention FLOPs (default: model.max_sequence_length)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def build_stats(config_path, overrides=(), seq_length=None):
    import torch

    from megatron_mesh.layers import local_block_spec
    from megatron_mesh.model import MeshGPTModel
    from megatron_mesh.parallel.process_groups import initialize_single_process
    from megatron_mesh.stats import model_stats
    from megatron_mesh.yaml_config import load_model_config

    # CPU initialisation and the local spec, or megatron/TE would allocate on the GPU despite
    # the meta device; the parameter shapes are the same under every spec.
    cfg = load_model_config(
        config_path, overrides, perform_initialization=False, use_cpu_initialization=True
    )
    initialize_single_process()
    with torch.device("meta"):
        model = MeshGPTModel(cfg, spec=local_block_spec())
    return model_stats(model, seq_length or cfg.max_sequence_length)


def main(argv=None):
    from megatron_mesh.yaml_config import ConfigError

    args = parse_args(argv)
    try:
        stats = build_stats(args.config, args.overrides, args.seq_length)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if args.json:
        print(json.dumps(stats.as_dict()))
        return
    rows = [
        ("config", args.config),
        ("layout", f"{stats.layout} ({stats.state_scheme})"),
        ("N_compute (unrolled layers)", stats.n_compute),
        ("unique layers", stats.unique_layers),
        ("total parameters", f"{stats.total_params:,}"),
        ("embedding parameters", f"{stats.embedding_params:,}"),
        ("non-embedding parameters", f"{stats.non_embedding_params:,}"),
        ("router parameters", f"{stats.router_params:,}"),
        (f"training FLOPs/token (seq {stats.seq_length})", f"{stats.train_flops_per_token:.4e}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
