#!/usr/bin/env python
"""Convert checkpoints between megatron-mesh (torch_dist) and Hugging Face.

    python tools/convert.py megatron-to-hf --input CHECKPOINT_DIR --output HF_DIR \
        [--iteration N] [--dtype fp32|bf16] [--tokenizer PATH_OR_NAME] [--force] \
        [--no-verify] [--allow-non-finite]

    python tools/convert.py hf-to-megatron --input HF_DIR --output CHECKPOINT_DIR \
        [--layout 4+8R2+4 --state-scheme mesh --core-init average|lower|stepwise] \
        [--buffer-slots B] [--scale-embeddings | --no-scale-embeddings] [--force]

    python tools/convert.py hf-to-megatron --input HF_DIR --output CHECKPOINT_DIR \
        --retrofit --layout 4+8R4+4 [--layers 0-3,10-17,18-21] [--state-scheme additive_injection]

megatron-to-hf reads a torch_dist checkpoint saved at any TP/PP layout on one CPU process (no
GPU, no torch.distributed job), after checking every file against the checkpoint's integrity
manifest, and refuses weights holding NaN/Inf. Vanilla layouts become plain GPTNeoXForCausalLM,
LlamaForCausalLM or Qwen2ForCausalLM; recursive ones load with
AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True).

hf-to-megatron reads a megatron-mesh export, a GPT-NeoX/Pythia, Llama or Qwen2 model and writes a Megatron
release checkpoint: `tools/pretrain_mesh.py` with checkpointing.load (or .pretrained) pointing
at it starts from these weights at iteration 0 with a fresh optimizer, at any TP/PP size. With
--layout/--state-scheme a vanilla model seeds a recursive one of the same depth (rules in
megatron_mesh/hf/importer.py). With --retrofit a vanilla model's layers, chosen by index
(--layers; default the first P, the last D and the C before them), become a tied P+CRK+D model
that at one loop step is the source without the other layers (megatron_mesh/hf/retrofit.py).
The checkpoint's model section is written to model.yml; train with the same one.

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
    h2m.add_argument("--state-scheme", default=None,
                     help="scheme of the re-shaped model (default base; with --retrofit additive_injection)")
    h2m.add_argument("--retrofit", action="store_true",
                     help="make a tied --layout from chosen layers of a vanilla model (retrofitted recurrence)")
    h2m.add_argument("--layers", default=None, metavar="P,C,D",
                     help="with --retrofit: the prelude's, core's and coda's source layers, e.g. "
                          "0-3,10-17,18-21 (default: first P, last D, the C before them)")
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
    elif args.layers and not args.retrofit:
        cli.fail("--layers chooses the layers of a --retrofit: add --retrofit")
    elif args.retrofit:
        out = _retrofit(args)
    else:
        from megatron_mesh.hf.importer import hf_to_megatron

        out = hf_to_megatron(args.input, args.output, layout=args.layout, state_scheme=args.state_scheme,
                             core_init=args.core_init, buffer_slots=args.buffer_slots,
                             scale_embeddings=args.scale_embeddings, tokenizer=args.tokenizer,
                             force=args.force, seed=args.seed)
    print(f"wrote {out}")


def _retrofit(args):
    from megatron_mesh.hf.importer import retrofit
    from megatron_mesh.hf.retrofit import RETROFIT_SCHEME

    if not args.layout:
        cli.fail("--retrofit needs --layout P+CRK+D, e.g. --layout 4+8R4+4")
    if args.core_init != "average" or args.scale_embeddings is not None:
        cli.fail("--retrofit keeps the source's layers and embeddings: drop --core-init and "
                 "--scale-embeddings")
    done = retrofit(args.input, args.output, layout=args.layout, layers=args.layers,
                    state_scheme=args.state_scheme or RETROFIT_SCHEME, buffer_slots=args.buffer_slots,
                    tokenizer=args.tokenizer, force=args.force, seed=args.seed)
    print(f"retrofit: layers {done.selection} (prelude, core, coda); dropped "
          f"{list(done.dropped) or 'none'}")
    if done.exact:
        print("retrofit: at one loop step the model computes the source without the dropped layers")
    else:
        print(f"retrofit: state_scheme {args.state_scheme} starts from its own initialisation, so at "
              f"one loop step the model is not the source without the dropped layers")
    return done.path


if __name__ == "__main__":
    main()
