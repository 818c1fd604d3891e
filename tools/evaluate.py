#!/usr/bin/env python
"""Evaluate megatron-mesh models the way the paper does.

    python tools/evaluate.py lm-eval --model HF_DIR [--tasks t1,t2,...] [--num-fewshot 0,5] \
        [--batch-size 8] [--device cuda] [--limit N] [--include-path TASK_DIR] [--output FILE.json]

lm-eval runs lm-evaluation-harness on an HF export (tools/convert.py megatron-to-hf) on the
paper's nine tasks by default (LAMBADA OpenAI/standard, HellaSwag, PIQA, WinoGrande, ARC-E,
ARC-C, SciQ, continuation-MMLU), prints a table shaped like the paper's Table 2 (accuracy in
percent; byte-length-normalised accuracy for PIQA, HellaSwag, ARC and SciQ) and saves JSON with
lm-eval's full results. Datasets come from the Hugging Face cache (HF_DATASETS_OFFLINE=1 on
machines without network); --include-path adds local task YAMLs.

    python tools/evaluate.py ppl --model M [--model M2 ...] [--name N --name N2 ...] --data D \
        [--data D2 ...] [--tokenizer T] [--seq-length L] [--batch-size B] [--max-documents N] \
        [--output FILE.json] [--no-progress]

ppl prints the perplexity of every model (Megatron checkpoint directory, run as MeshGPTModel, or
HF export / GPT-NeoX directory, run through transformers) on every dataset (indexed-dataset
prefix, or jsonl tokenized with --tokenizer, else the model's own tokenizer). Context: each
document is scored on its own; its tokens after the first are predicted once, in consecutive
non-overlapping windows of at most L tokens (default: the model's max_sequence_length), each
window conditioned only on itself (lm-eval's rolling loglikelihood without overlap). --output
saves token counts, mean NLL (nats/token), perplexity and bits per token as JSON.

    python tools/evaluate.py depth --model M [--name N] --data D [--max-loops T] [--output DIR] ...

depth scores a recursive model after t = 0..T loop iterations (default T = the trained K; more
only for tied cores without per-step parameters): the t-loop read-out, the coda lens (coda +
final norm + output layer on h(t)) and the direct lens (final norm + output layer on h(t)),
with the same windows as ppl. --output (or --output-dir) DIR writes depth.json and depth.png.

    python tools/evaluate.py exit --model M --data D [--kl 1e-3,1e-2] [--entropy 2,3] \
        [--gate 0.5,0.9] [--max-steps T] [--generate-tokens 32 --prompts 4] [--output DIR] ...

exit measures test-time compute: held-out loss against mean loop steps per token for fixed
depths 1..T, per-token KL exit (default thresholds 1e-4..0.1), entropy exit (--entropy) and,
for models trained with exit gates, the learned gate (exit CDF thresholds, default 0.3..0.9),
through the HF recursive model (an export, or a Megatron checkpoint converted in memory). It
prints the table, the steps each policy saves against the cheapest fixed depth as good, and
(--generate-tokens N) greedy decoding's tokens/s and steps per generated token at batch 1.
--output (or --output-dir) DIR writes exit.json and exit.png.

Models are labelled with --name, else after their run (runs/demo/checkpoints: 'demo',
runs/demo/hf: 'demo/hf'). ppl and depth print progress lines to stderr (documents done, tokens/s,
ETA; --no-progress: none); stdout holds only the table and what was written.
"""

import argparse
import math
from pathlib import Path

from _bootstrap import cli


TRUST_HELP = ("run the Python files of a foreign Hugging Face model directory (its auto_map), "
              "as transformers' trust_remote_code; megatron-mesh exports always load with this "
              "package's own code, never the folder's")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lm = sub.add_parser("lm-eval", help="downstream tasks with lm-evaluation-harness (Table 2)")
    lm.add_argument("--model", required=True, help="HF model directory")
    lm.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (default: the paper's nine)")
    lm.add_argument("--num-fewshot", default="0,5", help="comma-separated shot counts (default 0,5)")
    lm.add_argument("--batch-size", type=int, default=8)
    lm.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    lm.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    lm.add_argument("--limit", type=float, default=None, help="examples per task (smoke runs only)")
    lm.add_argument("--include-path", default=None, help="directory of extra task YAMLs")
    lm.add_argument("--name", default=None, help="row label (default: the run, e.g. 'demo/hf' for runs/demo/hf)")
    cli.add_output(lm, default=None, help="JSON report (default: MODEL/lm_eval.json)")
    lm.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    ppl = sub.add_parser("ppl", help="perplexity of models on datasets",
                         description=CONTEXT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ppl.add_argument("--model", action="append", required=True,
                     help="Megatron checkpoint or HF model directory (repeat for several)")
    ppl.add_argument("--name", action="append", default=None,
                     help="row label per --model, in order (default: the run, e.g. 'demo' for "
                          "runs/demo/checkpoints, 'demo/hf' for runs/demo/hf)")
    _data_args(ppl, many=True)
    cli.add_output(ppl, default=None, help="JSON report (default: print only)")
    ppl.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    depth = sub.add_parser("depth", help="loss after each loop iteration, with logit lenses",
                           description=CONTEXT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    depth.add_argument("--model", required=True, help="Megatron checkpoint or HF model directory")
    depth.add_argument("--name", default=None,
                       help="label in the table and figure (default: the run, e.g. 'demo' for "
                            "runs/demo/checkpoints)")
    _data_args(depth, many=False)
    depth.add_argument("--max-loops", type=int, default=None,
                       help="read out after 0..T iterations (default: the trained K)")
    cli.add_output(depth, "--output-dir", default=None,
                   help="directory for depth.json and depth.png (default: print only)")

    exits = sub.add_parser("exit", help="loss vs loop steps per token: fixed depth, KL exit, learned gate",
                           description=CONTEXT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    exits.add_argument("--model", required=True, help="Megatron checkpoint or HF export directory")
    exits.add_argument("--name", default=None, help="label in the figure (default: the run)")
    _data_args(exits, many=False)
    exits.add_argument("--kl", default=None, help="comma-separated KL thresholds in nats "
                       "(default 1e-4,1e-3,3e-3,1e-2,3e-2,0.1; 'none': no KL exit)")
    exits.add_argument("--entropy", default="none", help="comma-separated entropy thresholds in nats "
                       "(default none)")
    exits.add_argument("--gate", default=None, help="comma-separated exit-CDF thresholds of the "
                       "learned gate (default 0.3,0.5,0.7,0.9 for models with exit gates)")
    exits.add_argument("--max-steps", type=int, default=None,
                       help="most loop steps per token, and fixed depths 1..T (default: the trained K)")
    exits.add_argument("--generate-tokens", type=int, default=0,
                       help="time greedy decoding of this many tokens per prompt (default 0: no timing)")
    exits.add_argument("--prompts", type=int, default=4,
                       help="prompts for --generate-tokens: the first documents of the data (default 4)")
    exits.add_argument("--prompt-length", type=int, default=None,
                       help="tokens of each prompt, at most the model's length less --generate-tokens "
                            "(default 64, or less where the model is shorter)")
    cli.add_output(exits, "--output-dir", default=None,
                   help="directory for exit.json and exit.png (default: print only)")
    return parser.parse_args(argv)


def _thresholds(text, flag: str, default=None):
    """Comma-separated floats of ``flag``; 'none' is no thresholds, None the default."""
    if text is None:
        return default
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = (math.nan,)
    if not values or any(math.isnan(v) for v in values):
        cli.fail(f"{flag} {text}: expected comma-separated numbers, or 'none'")
    return values


CONTEXT_HELP = """Context: each document is scored on its own. Its inputs (all tokens but the last) are
cut into consecutive non-overlapping windows of at most --seq-length tokens (default: the
model's max_sequence_length); each window predicts the next token at every position from its
own tokens only, so every token but a document's first is predicted exactly once (lm-eval's
rolling loglikelihood without overlap). Mean NLL is in nats per token."""


def _data_args(parser: argparse.ArgumentParser, many: bool) -> None:
    parser.add_argument("--data", action="append" if many else "store", required=True,
                        help="indexed-dataset prefix (PREFIX.bin/.idx) or jsonl file"
                        + (" (repeat for several)" if many else ""))
    parser.add_argument("--tokenizer", default=None,
                        help="for jsonl data (default: the model's own tokenizer)")
    parser.add_argument("--json-key", default="text", help="jsonl field holding the text")
    parser.add_argument("--append-eod", action="store_true",
                        help="end each jsonl document with the end-of-document token, as "
                        "preprocessing does for indexed datasets")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="window length L (default: the model's max_sequence_length)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="score only the first N documents of each dataset")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress lines (on stderr: they never mix into the table or --output)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the hash check of a Megatron checkpoint against its integrity manifest "
                             "(file sizes are still checked)")


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    {"lm-eval": lm_eval_main, "ppl": ppl_main, "depth": depth_main,
     "exit": exit_main}[args.command](args)


def lm_eval_main(args):
    from megatron_mesh.evaluation import downstream

    model = downstream.check_model_dir(args.model)
    shots = downstream.parse_shots(args.num_fewshot)
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    report = downstream.evaluate(model, tasks=tasks, shots=shots, batch_size=args.batch_size,
                                 device=_device(args), limit=args.limit, include_path=args.include_path,
                                 dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    output = Path(args.output) if args.output else model / "lm_eval.json"
    downstream.save(report, output)
    print(downstream.table(report, args.name))
    print(f"wrote {output}")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_inputs(args, models, datasets) -> None:
    """Model directories and data files exist, numbers make sense: exit naming the problem
    before the (slow) imports of torch and megatron-core."""
    for model in models:
        if not Path(model).is_dir():
            cli.fail(f"--model {model}: no such model directory")
    for data in datasets:
        # either half: the reader names the missing one
        indexed = Path(f"{data}.bin").is_file() or Path(f"{data}.idx").is_file()
        if not indexed and not Path(data).is_file():
            cli.fail(f"--data {data}: neither an indexed dataset prefix ({data}.bin/.idx) nor a jsonl file")
    if args.batch_size < 1 or (args.max_documents is not None and args.max_documents < 1):
        cli.fail("--batch-size and --max-documents must be >= 1")
    if args.seq_length is not None and args.seq_length < 1:
        cli.fail(f"--seq-length {args.seq_length}: expected >= 1")
    if args.tokenizer:
        from megatron_mesh.data.tokenizer import tokenizer_source

        tokenizer_source(args.tokenizer, "--tokenizer")  # the one tokenizer rule: TokenizerSpecError
    if args.command == "ppl" and args.name is not None and len(args.name) != len(models):
        cli.fail(f"--name given {len(args.name)} times for {len(models)} --model: "
                 f"expected one per model, in order")


def _progress(args):
    """Progress lines on stderr (stdout holds the table), or none with --no-progress."""
    from megatron_mesh.progress import SILENT, ProgressLines

    return SILENT if args.no_progress else ProgressLines(prefix=f"[{args.command}]")


def _documents(args, data: str, model_tokenizer):
    """Token documents of ``data``: indexed as stored, jsonl tokenized (exit if no tokenizer)."""
    from megatron_mesh.data.documents import is_indexed_prefix, read_documents

    tokenizer = args.tokenizer or model_tokenizer
    if not is_indexed_prefix(data) and tokenizer is None:
        cli.fail(f"--data {data}: a jsonl file needs a tokenizer and the model names none; pass --tokenizer")
    return read_documents(data, tokenizer, key=args.json_key, append_eod=args.append_eod)


def ppl_main(args):
    _check_inputs(args, args.model, args.data)
    from megatron_mesh.data.documents import count_documents
    from megatron_mesh.evaluation import downstream, perplexity

    device, records, progress = _device(args), [], _progress(args)
    for i, path in enumerate(args.model):
        progress.note(f"loading {path}")
        scorer = perplexity.load_scorer(path, device, verify_hashes=not args.no_verify,
                                        name=args.name[i] if args.name else None,
                                        trust_remote_code=args.trust_remote_code)
        seq_length = perplexity.check_seq_length(args.seq_length, scorer.max_length, scorer.name)
        for data in args.data:
            result = perplexity.evaluate(scorer, _documents(args, data, scorer.tokenizer), seq_length,
                                         batch_size=args.batch_size, max_documents=args.max_documents,
                                         source=data, progress=progress,
                                         total_documents=count_documents(data))
            records.append({"model": str(path), "name": scorer.name, "backend": scorer.backend,
                            "data": str(data), "seq_length": seq_length, **result.as_dict()})
    print(perplexity.table(records))
    if args.output:
        downstream.save({"context": CONTEXT_HELP.replace("\n", " "), "results": records}, args.output)
        print(f"wrote {args.output}")


def depth_main(args):
    _check_inputs(args, [args.model], [args.data])
    if args.max_loops is not None and args.max_loops < 0:
        cli.fail(f"--max-loops {args.max_loops}: expected >= 0")
    from megatron_mesh.data.documents import count_documents
    from megatron_mesh.evaluation import depth, downstream, perplexity
    from megatron_mesh.evaluation.loading import load_model

    progress = _progress(args)
    progress.note(f"loading {args.model}")
    loaded = load_model(args.model, device=_device(args), verify_hashes=not args.no_verify)
    loaded.name = args.name or loaded.name
    depth.trained_loops(loaded)
    seq_length = perplexity.check_seq_length(args.seq_length, loaded.config.max_sequence_length,
                                             loaded.name)
    report = depth.study(loaded, _documents(args, args.data, loaded.tokenizer), seq_length,
                         max_loops=args.max_loops, batch_size=args.batch_size,
                         max_documents=args.max_documents, source=args.data, progress=progress,
                         total_documents=count_documents(args.data))
    print(depth.table(report))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        downstream.save(report, out / "depth.json")
        depth.plot(report, out / "depth.png")
        print(f"wrote {out / 'depth.json'} and {out / 'depth.png'}")


def exit_main(args):
    _check_inputs(args, [args.model], [args.data])
    if args.max_steps is not None and args.max_steps < 1:
        cli.fail(f"--max-steps {args.max_steps}: expected >= 1")
    if args.generate_tokens < 0 or args.prompts < 1 or (args.prompt_length or 1) < 1:
        cli.fail("--generate-tokens must be >= 0, --prompts and --prompt-length >= 1")
    kl = _thresholds(args.kl, "--kl")
    entropy = _thresholds(args.entropy, "--entropy")
    gate = _thresholds(args.gate, "--gate")
    from megatron_mesh.data.documents import count_documents
    from megatron_mesh.evaluation import downstream, exits, perplexity
    from megatron_mesh.evaluation.names import model_name

    progress = _progress(args)
    progress.note(f"loading {args.model}")
    model, tokenizer = exits.twin_model(args.model, _device(args), verify_hashes=not args.no_verify)
    name = args.name or model_name(Path(args.model))
    points = exits.default_points(model, args.max_steps, kl=exits.DEFAULT_KL if kl is None else kl,
                                  entropy=entropy, gate=gate)
    exits.check_points(model, points, args.max_steps)
    max_length = model.config.max_position_embeddings
    seq_length = perplexity.check_seq_length(args.seq_length, max_length, name)
    prompt_length = args.prompt_length or max(1, min(64, max_length - args.generate_tokens))
    if args.generate_tokens and prompt_length + args.generate_tokens > max_length:
        cli.fail(f"--prompt-length {prompt_length} + --generate-tokens {args.generate_tokens}: "
                 f"expected at most the model's {max_length} positions")
    report = exits.frontier(model, _documents(args, args.data, tokenizer), seq_length, points,
                            max_steps=args.max_steps, batch_size=args.batch_size,
                            max_documents=args.max_documents, source=args.data, progress=progress,
                            total_documents=count_documents(args.data))
    report["name"] = name
    print(exits.table(report))
    for line in exits.savings(report):
        print(line)
    if args.generate_tokens:
        prompts = exits.prompts_of(_documents(args, args.data, tokenizer), args.prompts, prompt_length)
        report["generation"] = exits.generation(model, prompts, points, args.generate_tokens,
                                                args.max_steps)
        print(exits.generation_table(report["generation"]))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        downstream.save(report, out / "exit.json")
        exits.plot(report, out / "exit.png", title=f"{name}: loss vs test-time compute")
        print(f"wrote {out / 'exit.json'} and {out / 'exit.png'}")


if __name__ == "__main__":
    main()
