"""The paper's Figures 3, 4 and 5 from probe.json's model records: one panel per model.

matplotlib only (Agg, no display). Every figure is PANEL_WIDTH x PANEL_HEIGHT inches per panel at
DPI, panels side by side, saved without tight bounding boxes, so a PNG of n models is exactly
(n * 450) x 400 pixels.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PANEL_WIDTH, PANEL_HEIGHT, DPI = 4.5, 4.0, 100
"""Inches per panel and dots per inch: each panel is 450 x 400 pixels."""

FILES = {"update_magnitude": "update_magnitude.png", "cka": "cka.png", "spectrum": "spectrum.png"}


def figure_size(panels: int) -> Tuple[int, int]:
    """(width, height) in pixels of a figure with ``panels`` models."""
    return int(round(panels * PANEL_WIDTH * DPI)), int(round(PANEL_HEIGHT * DPI))


def _panels(models: Sequence[dict], sharey: bool = False):
    """One axes per model, side by side; ``sharey`` puts bars and spectra on one scale."""
    fig, axes = plt.subplots(1, len(models), figsize=(len(models) * PANEL_WIDTH, PANEL_HEIGHT),
                             dpi=DPI, squeeze=False, sharey=sharey, layout="constrained")
    return fig, list(axes[0])


def update_magnitude_figure(models: Sequence[dict]):
    """Fig. 3: per block, the mean relative update magnitude with std error bars."""
    fig, axes = _panels(models, sharey=True)
    top = max(max(np.add(m["update_magnitude"]["mean"], m["update_magnitude"]["std"]))
              for m in models)
    for ax, model in zip(axes, models):
        data = model["update_magnitude"]
        x = np.arange(len(data["blocks"]))
        ax.bar(x, data["mean"], yerr=data["std"], capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(x, data["blocks"], rotation=30, ha="right")
        ax.set_ylim(0, max(top * 1.1, 1e-6))
        ax.set_title(model["name"])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("relative update magnitude")
    return fig, axes


def cka_figure(models: Sequence[dict], kind: str = "rbf"):
    """Fig. 4: mean pairwise CKA as an annotated heatmap, one colour scale 0..1 for all panels."""
    fig, axes = _panels(models)
    image = None
    for ax, model in zip(axes, models):
        labels, mean = model["cka"]["states"], np.asarray(model["cka"][kind]["mean"])
        image = ax.imshow(mean, vmin=0.0, vmax=1.0, cmap="viridis")
        ticks = np.arange(len(labels))
        ax.set_xticks(ticks, labels, rotation=45, ha="right")
        ax.set_yticks(ticks, labels)
        size = max(4, 10 - len(labels) // 2)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=size,
                        color="black" if mean[i, j] > 0.6 else "white")
        ax.set_title(model["name"])
        ax.set_xlabel(cka_caption(model), fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"CKA ({kind})")
    return fig, axes


def cka_caption(model: dict) -> str:
    """What h(0) is for this model (probe.first_state) and what h_out is, wrapped to the panel."""
    parts = [model["h0"]["caption"]] if model.get("h0") and "h(0)" in model["cka"]["states"] else []
    parts.append("h_out = the coda output before the final norm")
    return "\n".join(textwrap.fill(part, 70) for part in parts)


def state_label(model: dict, state: str) -> str:
    """A legend entry: 'h(0) = random start x(0)' for the loop's first state, else the state."""
    h0 = model.get("h0")
    return f"h(0) = {h0['short']}" if state == "h(0)" and h0 else state


def spectrum_figure(models: Sequence[dict]):
    """Fig. 5: normalised singular values per state, log y, mean with a shaded +-std band
    (clipped above zero so the log axis can show it)."""
    fig, axes = _panels(models, sharey=True)
    for ax, model in zip(axes, models):
        data = model["spectrum"]
        mean, std = np.asarray(data["mean"]), np.asarray(data["std"])  # [n, r]
        x = np.arange(mean.shape[1])
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(data["states"])))
        for label, m, s, colour in zip(data["states"], mean, std, colours):
            floor = m[m > 0].min() * 1e-2 if (m > 0).any() else 1e-12
            ax.plot(x, m, label=state_label(model, label), color=colour)
            ax.fill_between(x, np.maximum(m - s, floor), m + s, color=colour, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("singular value index i")
        ax.set_title(model["name"])
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3,
                  frameon=False)  # below the panel: the curves fill its corners
    axes[0].set_ylabel(r"$\sigma_i / \sigma_0$")
    return fig, axes


FIGURES = {"update_magnitude": update_magnitude_figure, "cka": cka_figure,
           "spectrum": spectrum_figure}


def save_all(models: Sequence[dict], out_dir) -> Dict[str, Path]:
    """Write the three PNGs into ``out_dir``; returns {figure: path}."""
    paths: Dict[str, Path] = {}
    for key, build in FIGURES.items():
        fig, _ = build(models)
        paths[key] = Path(out_dir) / FILES[key]
        fig.savefig(paths[key], dpi=DPI)
        plt.close(fig)
    return paths

