#!/usr/bin/env python
"""Train every variant of a study at equal compute and tokens, then report (curves, table, probes).

    python tools/study.py --study configs/study/cpu.yaml --output runs/study-cpu \
        [--only mesh --only vanilla] [--seeds 1234,1235] [--set training.train_iters=100] \
        [--time-limit MIN] [--skip-probes] [--report-only] [--keep-checkpoints]

Resumable: rerun the same command after an interruption; finished runs are skipped (their
final checkpoint exists), an interrupted one continues from its last checkpoint, and the report
is written once every run is done. ``--time-limit`` stops the running trainer with SIGTERM
(Megatron saves and exits) after MIN minutes and exits with status 3: rerun to continue.
Outputs in OUT: study_state.json, runs/<variant>-s<seed>/ (checkpoints, tensorboard,
train.log, heldout.json), curves.png, table.md, results.json, probes/.
"""

import argparse
import sys
import time
from pathlib import Path

from _bootstrap import cli


def seed_list(text: str):
    """--seeds: comma-separated integers (a bad one is argparse's usage error, status 2); an
    empty value keeps the study's seeds."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1234,1235") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="study YAML (configs/study/*.yaml)")
    cli.add_output(parser, "--out", required=True, help="study directory (created; reused to resume)")
    parser.add_argument("--only", action="append", default=[], metavar="VARIANT",
                        help="train and report only these variants (repeatable)")
    parser.add_argument("--seeds", type=seed_list, default=None,
                        help="comma-separated seeds, replacing the study's")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="add a shared config override for every run, e.g. data.path=[prefix]")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MIN",
                        help="stop (resumably) after this many minutes of training")
    parser.add_argument("--skip-probes", action="store_true", help="no probes/ in the report")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report finished runs")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every saved iteration (default: only each run's final one)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress lines of the held-out evaluations and probes (stderr)")
    return parser.parse_args(argv)


@cli.tool
def main(argv=None):
    args = parse_args(argv)
    import megatron_mesh  # CPU shims before megatron.core

    megatron_mesh.compat.silence_known_megatron_warnings()  # its notes on absent kernels
    import torch

    from megatron_mesh.progress import SILENT, ProgressLines
    from megatron_mesh.study import plan, report, runner

    progress = SILENT if args.no_progress else ProgressLines(prefix="[study]")
    start = time.time()
    try:
        study = plan.load_study(args.study, args.sets, args.seeds)
        runs = plan.plan_runs(study, args.only)
        out = Path(args.output)
        if not args.report_only:
            deadline = start + 60 * args.time_limit if args.time_limit else None
            runner.train_all(study, runs, out, cpu=not torch.cuda.is_available(), deadline=deadline,
                             keep_intermediate=args.keep_checkpoints)
        results = report.write(study, runs, out, with_probes=not args.skip_probes, progress=progress)
    except runner.TimeLimit as err:
        print(f"[study] {err}; rerun the same command to continue", file=sys.stderr)
        sys.exit(3)
    print(report.markdown(results))
    print(f"[study] wrote {out}/: curves.png, table.md, results.json"
          + ("" if args.skip_probes or study.probes is None else ", probes/")
          + f" in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
