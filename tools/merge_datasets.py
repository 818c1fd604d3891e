#!/usr/bin/env python
"""Merge indexed-dataset shards into one .bin/.idx (e.g. Pythia's pre-shuffled shards, in order).

    python tools/merge_datasets.py --input shards/document-00000-of-00020 ... \
        --output-prefix data/pile-deduped-pythia-preshuffled/document

Every shard is checked first (magic, version, dtype, .bin length against the .idx); all shards
must share a dtype. The index is streamed (memory does not grow with the sequence count) and
the result is written under temporary names and renamed at the end, so an interrupted merge
never leaves a file pair that looks complete.
"""

import argparse

from _bootstrap import cli


def merge(inputs, output_prefix):
    from megatron_mesh.data.indexed import concatenate_indexed
    from megatron_mesh.data.integrity import check_indexed_dataset

    rows = concatenate_indexed(inputs, output_prefix)
    check_indexed_dataset(output_prefix)
    return rows


@cli.tool
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_input(parser, "--inputs", nargs="+", required=True, help="shard prefixes, in order")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    rows = merge(args.input, args.output_prefix)
    print(f"merged {len(args.input)} shards, {rows:,} sequences -> {args.output_prefix}.bin/.idx")


if __name__ == "__main__":
    main()
