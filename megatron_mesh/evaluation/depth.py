"""Depth study: what a recursive model predicts after t = 0..T loop iterations.

Three curves per iteration t, all scored like ``perplexity`` (one document at a time, disjoint
windows of at most L tokens, mean NLL in nats/token summed in float64):
- read-out: ``model(tokens, positions, num_loops=t)``, the model stopped after t loops;
- coda lens: the coda layers, final norm and output layer applied to h(t) of ONE forward pass
  (``states=[...]``). Every loop step depends only on the steps before it, so for t <= K this
  equals the t-step read-out; it is computed separately as a consistency check;
- direct lens: the final norm and output layer straight on h(t), skipping the coda (the classic
  logit lens): how far h(t) is from the output space without the coda's help.

T may exceed the trained K only where the model can loop further: a tied core and a state
scheme without per-step parameters (base, residual, anchor, mesh_shared, the injection schemes;
not mesh or the comb schemes). Both lenses read h(t) the way the coda reads the loop's end
(``scheme.end``: the injection schemes' readout). Every forward starts from the same random
state x(0) where the scheme draws one (FORWARD_SEED), so the curves are reproducible and the coda
lens still equals the read-out.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from megatron_mesh.errors import ConfigError, DataError
from megatron_mesh.evaluation.loading import LoadedModel
from megatron_mesh.evaluation.perplexity import Counted, check_ids, expected_documents, window_batches
from megatron_mesh.evaluation.tables import text_table
from megatron_mesh.model.block import Recorded
from megatron_mesh.progress import SILENT, Progress

CURVES = ("read_out", "coda_lens", "direct_lens")

FORWARD_SEED = 0
"""The torch seed each forward of the study runs under (random initial states)."""


def trained_loops(loaded: LoadedModel) -> int:
    """K, the loop count the model trained with; ConfigError for a model without a loop."""
    config = loaded.config
    if not config.parsed_layout.recursive:
        raise ConfigError(f"{loaded.name}: layout {config.layout!r} (state_scheme "
                          f"{config.state_scheme!r}) has no loop: a depth study needs a recursive "
                          f"layout such as 1+2R2+1")
    return config.num_loops


def check_max_loops(loaded: LoadedModel, max_loops: int) -> None:
    """The model runs ``max_loops`` iterations (a 1-token forward), else a ConfigError saying why."""
    model, config = loaded.model, loaded.config
    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.output_layer.weight.device)
    try:
        with torch.no_grad():
            model(tokens, tokens, num_loops=max_loops)
    except ValueError as err:
        raise ConfigError(f"{loaded.name}: --max-loops {max_loops} is not possible for layout "
                          f"{config.layout!r} with state_scheme {config.state_scheme!r} (trained "
                          f"K={config.num_loops}; only tied cores without per-step parameters loop "
                          f"further): {err}") from None


def _head(model, h: Tensor, rotary: Tensor, coda: bool) -> Tensor:
    """Logits [s, b, V] of a state h [s, b, h]: the scheme's readout, (coda layers +) final norm
    and output layer."""
    h = model.decoder.scheme.end(h, None)
    if coda:
        for layer in model.decoder.coda.values():
            h, _ = layer(h, attention_mask=None, rotary_pos_emb=rotary)
    logits, _ = model.output_layer(model.decoder.final_layernorm(h))
    return logits


def loop_states(model, inputs: Tensor, max_loops: int) -> List[Tensor]:
    """h(0) .. h(max_loops) [s, b, h] of one forward pass."""
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    states: List = []
    with _seeded(inputs.device):
        model(inputs, positions, num_loops=max_loops, states=states)
    named = dict(states)
    return [named[Recorded.loop_state(t)] for t in range(max_loops + 1)]


@torch.no_grad()
def batch_nll(model, inputs: Tensor, labels: Tensor, max_loops: int) -> Dict[str, List[float]]:
    """Summed NLL (float64) of one batch, per curve and t = 0..max_loops."""
    positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)  # [b, s]
    out: Dict[str, List[float]] = {c: [] for c in CURVES}
    for t in range(max_loops + 1):
        with _seeded(inputs.device):
            loss = model(inputs, positions, labels=labels, num_loops=t)  # [b, s]
        out["read_out"].append(loss.double().sum().item())
    rotary = model.rotary_pos_emb(inputs.shape[1])
    for h in loop_states(model, inputs, max_loops):
        for curve, coda in (("coda_lens", True), ("direct_lens", False)):
            loss = model.compute_language_model_loss(labels, _head(model, h, rotary, coda))  # [b, s]
            out[curve].append(loss.double().sum().item())
    return out


def study(loaded: LoadedModel, documents: Iterable[List[int]], seq_length: int, *,
          max_loops: Optional[int] = None, batch_size: int = 8,
          max_documents: Optional[int] = None, source: str = "data", progress: Progress = SILENT,
          total_documents: Optional[int] = None) -> dict:
    """The depth report: per t, the NLL and perplexity of each curve (module docstring);
    ``progress`` hears of every batch (``total_documents``: how many ``documents`` holds)."""
    K = trained_loops(loaded)
    T = K if max_loops is None else max_loops
    check_max_loops(loaded, T)
    model = loaded.model
    device = model.output_layer.weight.device
    sums = {c: [0.0] * (T + 1) for c in CURVES}
    tokens, docs = 0, Counted(itertools.islice(documents, max_documents))
    progress.start(f"{loaded.name} on {Path(source).name}, t = 0..{T}",
                   expected_documents(total_documents, max_documents))
    for inputs, labels in window_batches(docs, seq_length, batch_size):
        check_ids(torch.cat([inputs, labels[:, -1:]], 1), loaded.config.vocab_size, source)
        nll = batch_nll(model, inputs.to(device), labels.to(device), T)
        for curve in CURVES:
            sums[curve] = [a + b for a, b in zip(sums[curve], nll[curve])]
        tokens += labels.numel()
        progress.update(docs.count, tokens)
    if not tokens:
        raise DataError(f"{source}: no document with at least 2 tokens to score")
    progress.finish(docs.count, tokens)
    rows = [{"t": t, **{f"{c}_{k}": v for c in CURVES
                         for k, v in _stats(sums[c][t] / tokens).items()}} for t in range(T + 1)]
    config = model.config
    return {"model": loaded.name, "layout": config.layout, "state_scheme": config.state_scheme,
            "trained_loops": K, "max_loops": T, "data": str(source), "seq_length": seq_length,
            "tokens": tokens, "rows": rows}



@contextlib.contextmanager
def _seeded(device: torch.device):
    """The same random draws in every forward, the caller's RNG state untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(FORWARD_SEED)
        yield


def _stats(mean_nll: float) -> dict:
    return {"loss": mean_nll, "ppl": math.exp(mean_nll)}


def table(report: dict) -> str:
    """t | loss | ppl | coda-lens ppl | direct-lens ppl, the trained K marked."""
    header = ["t", "loss", "ppl", "coda-lens ppl", "direct-lens ppl"]
    rows = [[f"{r['t']}" + (" (K)" if r["t"] == report["trained_loops"] else ""),
             f"{r['read_out_loss']:.4f}", f"{r['read_out_ppl']:.3f}", f"{r['coda_lens_ppl']:.3f}",
             f"{r['direct_lens_ppl']:.3f}"] for r in report["rows"]]
    return text_table(header, rows)


CURVE_STYLES = {
    # the coda lens equals the read-out (module docstring): drawn on top with its own line and
    # marker, over the read-out's larger hollow circles, so neither hides the other
    "read_out": dict(label="read-out", linestyle="-", marker="o", markersize=9, fillstyle="none", zorder=2),
    "coda_lens": dict(label="coda lens", linestyle="--", marker="x", markersize=7, zorder=3),
    "direct_lens": dict(label="direct lens", linestyle=":", marker="s", markersize=5, zorder=2),
}
"""matplotlib keywords of each curve in ``depth_figure``."""

FIGURE_INCHES, FIGURE_DPI = (10.0, 4.5), 100


def _losses(report: dict, curve: str) -> List[float]:
    return [r[f"{curve}_loss"] for r in report["rows"]]


def _coda_lens_label(report: dict) -> str:
    """'coda lens (= read-out)' where the two agree at every t, as they should."""
    same = all(math.isclose(a, b, rel_tol=1e-5)
               for a, b in zip(_losses(report, "coda_lens"), _losses(report, "read_out")))
    return "coda lens (= read-out)" if same else "coda lens"


def _panel(ax, report: dict, curves, title: str) -> None:
    t = [r["t"] for r in report["rows"]]
    for curve in curves:
        style = dict(CURVE_STYLES[curve], color=f"C{CURVES.index(curve)}")
        if curve == "coda_lens":
            style["label"] = _coda_lens_label(report)
        ax.plot(t, _losses(report, curve), **style)
    ax.axvline(report["trained_loops"], color="grey", linestyle="--", linewidth=1,
               label=f"trained K = {report['trained_loops']}")
    ax.set_yscale("linear")  # loss differences, which a log perplexity axis would squash
    ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not '+6.257' and offsets
    ax.set_xticks(t)
    ax.set_xlabel("loop iterations t")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def depth_figure(report: dict):
    """Loss (nats/token, linear) against t: the read-out and coda lens (left), the direct lens
    with the read-out for reference (right, its own scale: it is often nats away); one legend
    below the panels, never over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    _panel(left, report, ("read_out", "coda_lens"), "read-out after t loops, coda lens on h(t)")
    _panel(right, report, ("read_out", "direct_lens"), "direct lens: final norm + output layer on h(t)")
    handles = dict(zip(*reversed(left.get_legend_handles_labels())))
    handles.update(zip(*reversed(right.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles),
               fontsize=9, frameon=False)
    fig.suptitle(f"{report['model']} ({report['layout']}, {report['state_scheme']}): "
                 f"{report['tokens']:,} tokens of {Path(report['data']).name}", fontsize=11)
    return fig


def plot(report: dict, path) -> None:
    """``depth_figure`` as a PNG, written atomically."""
    import matplotlib.pyplot as plt

    fig = depth_figure(report)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    tmp.replace(path)
