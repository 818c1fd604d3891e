"""A finished study's results: loss curves, a Table-1-shaped table and the probes.

- curves: Megatron's TensorBoard scalars 'lm loss' (every iteration) and 'lm loss validation'
  (every eval_interval and at the end; training.py evaluate_and_print_results), read from all
  event files of a run (a resumed run writes a new one; a later file wins for a step),
  x = iteration x global batch x seq length tokens;
- held-out loss: ``megatron_mesh.evaluation.perplexity`` on the final checkpoint over the
  documents of data.valid_path (each document scored on its own, disjoint windows; mean NLL in
  nats/token and its exp), cached in ``runs/<run>/heldout.json`` per checkpoint iteration;
- parameters: ``megatron_mesh.model.stats.model_stats`` of the loaded model;
- per variant, mean and population std (ddof 0; 0 with one seed) over seeds; deltas against
  the baseline variant's means; and seed-paired: rank and Δ vs the baseline within each seed;
- probes (Figs. 3-5, ``megatron_mesh.probing.probe``) of each variant's first-seed model on the
  held-out documents, side by side, into ``probes/``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Dict, List

import numpy as np

from megatron_mesh.checkpoint.paths import tracked_iteration
from megatron_mesh.progress import SILENT, Progress
from megatron_mesh.study.plan import Run, Study, StudyError, config_tree, data_prefixes
from megatron_mesh.study.runner import final_iteration, run_dir

TRAIN_TAG, VALID_TAG = "lm loss", "lm loss validation"


def scalars(tb_dir, tag: str) -> Dict[int, float]:
    """{step: value} of one TensorBoard scalar over every event file in ``tb_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def written(path: Path):  # events.out.tfevents.<unix time>.<host>.<pid>...
        stamp = path.name.split(".")[3]
        return (int(stamp) if stamp.isdigit() else 0, path.stat().st_mtime)

    values: Dict[int, float] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=written):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            values.update({e.step: float(e.value) for e in events.Scalars(tag)})
    return dict(sorted(values.items()))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _valid_prefixes(tree: dict, run: Run) -> List[str]:
    prefixes = data_prefixes((tree.get("data") or {}).get("valid_path"))
    if not prefixes:
        raise StudyError(f"run {run.name}: held-out evaluation needs data.valid_path (indexed "
                         f"held-out documents, not mock data)")
    return prefixes


def heldout(tree: dict, run: Run, out: Path, cfg: dict, device: str, *,
            progress: Progress = SILENT) -> dict:
    """Parameters and held-out loss/perplexity of the run's final checkpoint (cached);
    ``tree`` is the run's experiment tree, ``cfg`` the study's heldout settings."""
    from megatron_mesh.data.documents import count_documents, read_documents
    from megatron_mesh.evaluation import perplexity
    from megatron_mesh.evaluation.loading import load_model
    from megatron_mesh.model.stats import model_stats

    ckpt = run_dir(out, run) / "checkpoints"
    seq = cfg["seq_length"] or tree["training"]["seq_length"]
    key = {"iteration": tracked_iteration(ckpt), "data": _valid_prefixes(tree, run), "seq_length": seq,
           "max_documents": cfg["max_documents"]}
    cache = run_dir(out, run) / "heldout.json"
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        return cached
    progress.note(f"held-out evaluation of {run.name}: loading {ckpt}")
    loaded = load_model(ckpt, device=device)
    scorer = perplexity.megatron_scorer(loaded, device, name=run.name)
    docs = itertools.chain.from_iterable(read_documents(p) for p in key["data"])
    result = perplexity.evaluate(scorer, docs, min(seq, scorer.max_length), batch_size=cfg["batch_size"],
                                 max_documents=cfg["max_documents"], source=key["data"][0],
                                 progress=progress,
                                 total_documents=sum(count_documents(p) for p in key["data"]))
    record = {"key": key, **result.as_dict(), "stats": model_stats(loaded.model, seq).as_dict()}
    cache.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _mean_std(values: List[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": values}


def collect(study: Study, runs: List[Run], out: Path, device: str, progress: Progress = SILENT) -> dict:
    """results.json: per-run curves and held-out numbers, per-variant aggregates and deltas."""
    per_run, variants = {}, {}
    for run in runs:
        tree = config_tree(study, run)
        at, final = tracked_iteration(run_dir(out, run) / "checkpoints"), final_iteration(tree)
        if (at or 0) < final:
            raise StudyError(f"run {run.name} is not finished (iteration {at or 0} of {final}): "
                             f"train it first (tools/study.py without --report-only)")
        tokens_per_iter = tree["training"]["global_batch_size"] * tree["training"]["seq_length"]
        tb = run_dir(out, run) / "tensorboard"
        per_run[run.name] = {"variant": run.variant, "seed": run.seed,
                             "tokens_per_iteration": tokens_per_iter,
                             "train": scalars(tb, TRAIN_TAG), "valid": scalars(tb, VALID_TAG),
                             "heldout": heldout(tree, run, out, study.heldout, device,
                                                progress=progress)}
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [per_run[r.name] for r in runs if r.variant == variant]
        stats = mine[0]["heldout"]["stats"]
        variants[variant] = {
            "variant": variant, "layout": stats["layout"], "state_scheme": stats["state_scheme"],
            "n_compute": stats["n_compute"], "params": stats["total_params"],
            "non_embedding_params": stats["non_embedding_params"], "seeds": [m["seed"] for m in mine],
            "heldout_loss": _mean_std([m["heldout"]["mean_nll"] for m in mine]),
            "perplexity": _mean_std([m["heldout"]["perplexity"] for m in mine]),
            "heldout_tokens": mine[0]["heldout"]["tokens"]}
    base = variants.get(study.baseline)
    for entry in variants.values():
        if base is not None:
            entry["delta_loss"] = entry["heldout_loss"]["mean"] - base["heldout_loss"]["mean"]
            entry["delta_perplexity"] = entry["perplexity"]["mean"] - base["perplexity"]["mean"]
            entry["non_embedding_change"] = entry["non_embedding_params"] / base["non_embedding_params"] - 1
    results = {"study": str(study.path), "baseline": study.baseline if base else None,
               "variants": list(variants.values()), "runs": per_run}
    results["by_seed"] = by_seed(results)
    return results


def by_seed(results: dict) -> dict:
    """Seed-paired comparison: runs of one seed share the data order and differ only in the
    variant, so per-seed differences separate the variant from the seed's luck. Per variant: its
    held-out loss and rank (1 = lowest) in each seed that every variant finished, and its paired
    Δ loss vs the baseline of the same seed (mean, population std, min, max)."""
    loss: Dict[str, Dict[int, float]] = {}  # variant -> {seed: mean NLL}
    for run in results["runs"].values():
        loss.setdefault(run["variant"], {})[run["seed"]] = run["heldout"]["mean_nll"]
    seeds = sorted(set.intersection(*(set(per) for per in loss.values())))
    ranks: Dict[str, List[int]] = {v: [] for v in loss}
    for seed in seeds:
        for rank, variant in enumerate(sorted(loss, key=lambda v: loss[v][seed]), start=1):
            ranks[variant].append(rank)
    base = results["baseline"]
    variants = {}
    for variant, per in loss.items():
        entry = {"loss": [per[s] for s in seeds], "rank": ranks[variant],
                 "mean_rank": float(np.mean(ranks[variant])) if seeds else math.nan}
        if base:
            deltas = [per[s] - loss[base][s] for s in seeds]
            entry["paired_delta"] = {**_mean_std(deltas), "min": min(deltas, default=math.nan),
                                     "max": max(deltas, default=math.nan)}
        variants[variant] = entry
    return {"seeds": seeds, "variants": variants}


def _markdown_rows(head: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(results: dict) -> str:
    """table.md: the Table-1-shaped table, then the per-seed table."""
    return table(results) + "\n" + seed_table(results)


def mean_std(stats: dict, digits: int, n: int) -> str:
    """'4.1234 ± 0.0120' over n > 1 seeds; one seed has no spread to show: '4.1234'."""
    mean = f"{stats['mean']:.{digits}f}"
    return mean if n == 1 else f"{mean} ± {stats['std']:.{digits}f}"


def table(results: dict) -> str:
    """Table 1's shape: structure, parameters, held-out loss and perplexity, deltas."""
    base = results["baseline"]
    vs = f" vs {base}" if base else ""
    head = ["variant", "layout", "scheme", "params", "non-emb. params", "held-out loss", "perplexity",
            f"Δ loss{vs}", f"Δ ppl{vs}", "n (seeds)"]
    rows = []
    for v in results["variants"]:
        change = f" ({v['non_embedding_change']:+.1%})" if base and v["variant"] != base else ""
        loss, ppl, n = v["heldout_loss"], v["perplexity"], len(v["seeds"])
        delta = [f"{v['delta_loss']:+.4f}", f"{v['delta_perplexity']:+.3f}"] if base else ["-", "-"]
        rows.append([v["variant"], v["layout"], v["state_scheme"], f"{v['params'] / 1e6:.2f}M",
                     f"{v['non_embedding_params'] / 1e6:.2f}M{change}",
                     mean_std(loss, 4, n), mean_std(ppl, 3, n), *delta, str(n)])
    lines = _markdown_rows(head, rows)
    tokens = results["variants"][0]["heldout_tokens"]
    spread = ("one seed per variant (n = 1): single values, no spread" if all(len(v["seeds"]) == 1
              for v in results["variants"]) else "mean ± population std over the n seeds (n = 1: its value)")
    lines.append(f"\nHeld-out loss: mean NLL (nats/token) of the final checkpoints over {tokens:,} "
                 f"held-out tokens; {spread}.")
    return "\n".join(lines) + "\n"


def seed_table(results: dict) -> str:
    """Per-seed held-out loss, rank and paired Δ vs the baseline (``by_seed``)."""
    paired, base = results["by_seed"], results["baseline"]
    seeds = paired["seeds"]
    head = ["variant", *(f"loss s{s}" for s in seeds), "rank per seed", "mean rank"]
    spread = "" if len(seeds) == 1 else ": mean ± std [min, max]"
    head += [f"paired Δ loss vs {base}{spread}"] if base else []
    rows = []
    for variant, v in paired["variants"].items():
        row = [variant, *(f"{x:.4f}" for x in v["loss"]), " ".join(map(str, v["rank"])),
               f"{v['mean_rank']:.2f}"]
        if base:
            d = v["paired_delta"]
            row.append(f"{d['mean']:+.4f}" if len(seeds) == 1 else
                       f"{d['mean']:+.4f} ± {d['std']:.4f} [{d['min']:+.4f}, {d['max']:+.4f}]")
        rows.append(row)
    lines = _markdown_rows(head, rows)
    lines.append("\nRank 1 = lowest held-out loss among the variants of that seed; runs of one seed "
                 "share the data order, so a paired Δ compares variants on the same data.")
    return "\n".join(lines) + "\n"


def _band(curves: List[Dict[int, float]], smooth: int):
    """Steps common to every seed, and the mean / min / max over seeds (moving average)."""
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    ys = np.array([[c[s] for s in steps] for c in curves])  # [seeds, steps]
    w = max(1, min(smooth, len(steps)))
    if w > 1:
        ys = np.stack([np.convolve(y, np.ones(w) / w, mode="valid") for y in ys])
        steps = steps[w - 1:]
    return np.array(steps), ys.mean(0), ys.min(0), ys.max(0)


def plot(results: dict, path: Path) -> Path:
    """``curves_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = curves_figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_figure(results: dict):
    """Training and held-out loss vs tokens, every variant (mean over seeds, min/max band);
    one legend below both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    runs = results["runs"]
    for i, v in enumerate(results["variants"]):
        mine = [r for r in runs.values() if r["variant"] == v["variant"]]
        per_iter = mine[0]["tokens_per_iteration"]
        for ax, key in zip(axes, ("train", "valid")):
            curves = [{int(s): y for s, y in r[key].items()} for r in mine]
            if not all(curves):
                continue
            smooth = max(1, len(curves[0]) // 50) if key == "train" else 1
            steps, mean, low, high = _band(curves, smooth)
            color = f"C{i}"
            ax.plot(steps * per_iter, mean, color=color, marker="o" if key == "valid" else None,
                    markersize=3, label=f"{v['variant']} ({v['layout']})")
            ax.fill_between(steps * per_iter, low, high, color=color, alpha=0.2, linewidth=0)
    for ax, title in zip(axes, ("training loss", "held-out loss (Megatron validation)")):
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("lm loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    labelled = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(labelled.values()), list(labelled), loc="outside lower center", fontsize=8,
               ncols=min(4, max(1, len(labelled))), frameon=False)  # below the panels, off the curves
    return fig


def probes(study: Study, runs: List[Run], out: Path, device: str, progress: Progress = SILENT) -> Path:
    """Figs. 3-5 of each variant's first-seed final model, side by side, into out/probes."""
    from megatron_mesh.probing import probe

    first = {}
    for run in runs:
        first.setdefault(run.variant, run)
    tree = config_tree(study, next(iter(first.values())))
    data, cfg = _valid_prefixes(tree, runs[0])[0], study.probes
    seq = cfg["seq_length"] or tree["training"]["seq_length"]
    found = probe.probe_paths([str(run_dir(out, r) / "checkpoints") for r in first.values()], data,
                              cfg["samples"], seq_length=seq, names=list(first), batch_size=cfg["batch_size"],
                              device=device, progress=progress)
    settings = {"data": data, "samples": cfg["samples"], "cka_threshold": 1.0, "device": device}
    return probe.write_report(probe.report(found, settings), out / "probes", force=True)


def write(study: Study, runs: List[Run], out: Path, with_probes: bool = True,
          progress: Progress = SILENT) -> dict:
    """results.json, table.md, curves.png (and probes/) into ``out``; returns the results;
    ``progress`` hears of the held-out evaluations and probes."""
    out, device = Path(out), _device()
    results = collect(study, runs, out, device, progress)
    bad = [v["variant"] for v in results["variants"] if not math.isfinite(v["heldout_loss"]["mean"])]
    if bad:
        raise StudyError(f"non-finite held-out loss for {bad}")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(markdown(results))
    plot(results, out / "curves.png")
    if with_probes and study.probes is not None:
        probes(study, runs, out, device, progress)
    return results
