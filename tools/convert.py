#!/usr/bin/env python
"""Convert checkpoints between megatron-mesh (torch_dist) and Hugging Face.

    python tools/convert.py megatron-to-hf --input CHECKPOINT_DIR --output HF_DIR \
        [--iteration N] [--dtype fp32|bf16] [--tokenizer PATH_OR_NAME] [--force] \
        [--no-verify] [--allow-non-finite]

    python tools/convert.py hf-to-megatron --input HF_DIR --output CHECKPOINT_DIR \
        [--layout 4+8R2+4 --state-scheme mesh --core-init average|lower|stepwise] \
        [--buffer-slots B] [--scale-embeddings | --no-scale-embeddings] [--force]

megatron-to-hf reads a torch_dist checkpoint saved at any TP/PP layout on one CPU process (no
GPU, no torch.distributed job), after checking every file against the checkpoint's integrity
manifest, and refuses weights holding NaN/Inf. Vanilla layouts become plain GPTNeoXForCausalLM; recursive ones
load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

hf-to-megatron reads a megatron-mesh export or a GPT-NeoX/Pythia model and writes a Megatron
release checkpoint: `tools/pretrain_mesh.py` with checkpointing.load (or .pretrained) pointing
at it starts from these weights at iteration 0 with a fresh optimizer, at any TP/PP size. With
--layout/--state-scheme a vanilla model seeds a recursive one of the same depth (rules in
megatron_mesh/hf/importer.py). The checkpoint's model section is written to model.yml; train
with the same one.

Either output directory appears only when complete; a non-empty one is replaced only with --force.
"""

import argparse

from _bootstrap import cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    m2h = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint -> HF directory")
    cli.add_input(m2h, "--load", required=True, metavar="DIR",
                  help="Megatron checkpoint: a save directory or one iteration directory")
    cli.add_output(m2h, required=True, metavar="DIR", help="HF directory to write")
    m2h.add_argument("--iteration", type=int, default=None)
    m2h.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    m2h.add_argument("--tokenizer", default=None, help="default: the tokenizer the run trained with")
    cli.add_force(m2h)
    m2h.add_argument("--no-verify", action="store_true",
                     help="skip the hash check against the checkpoint's integrity manifest "
                          "(file sizes are still checked)")
    m2h.add_argument("--allow-non-finite", action="store_true",
                     help="export weights holding NaN/Inf instead of refusing")

    h2m = sub.add_parser("hf-to-megatron", help="HF directory -> torch_dist release checkpoint")
    cli.add_input(h2m, "--hf", required=True, metavar="DIR",
                  help="HF model directory (megatron-mesh export or GPT-NeoX)")
    cli.add_output(h2m, required=True, metavar="DIR", help="release checkpoint directory to write")
    h2m.add_argument("--layout", default=None, help="re-shape a vanilla model, e.g. 4+8R2+4")
    h2m.add_argument("--state-scheme", default=None, help="scheme of the re-shaped model (default base)")
    h2m.add_argument("--core-init", choices=["average", "lower", "stepwise"], default="average")
    h2m.add_argument("--buffer-slots", type=int, default=None)
    h2m.add_argument("--scale-embeddings", action=argparse.BooleanOptionalAction, default=None,
                     help="multiply embeddings by sqrt(d) in the model (table rescaled to match)")
    h2m.add_argument("--tokenizer", default=None, help="default: the HF directory, if it has one")
    h2m.add_argument("--seed", type=int, default=1234, help="init of new state-scheme parameters")
    cli.add_force(h2m)
    return parser.parse_args(argv)


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # after parsing (--help stays light): CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    if args.direction == "megatron-to-hf":
        from megatron_mesh.hf.export import export

        out = export(args.input, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                     iteration=args.iteration, force=args.force, verify_hashes=not args.no_verify,
                     allow_non_finite=args.allow_non_finite)
    else:
        from megatron_mesh.hf.importer import hf_to_megatron

        out = hf_to_megatron(args.input, args.output, layout=args.layout, state_scheme=args.state_scheme,
                             core_init=args.core_init, buffer_slots=args.buffer_slots,
                             scale_embeddings=args.scale_embeddings, tokenizer=args.tokenizer,
                             force=args.force, seed=args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
