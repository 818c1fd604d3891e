"""The study's table and curves as a reader sees them: no '± 0.0000' for one seed, the seed
count beside every mean, and a legend that stays off the curves."""

from megatron_mesh.study.report import by_seed, curves_figure, markdown


def results(seeds):
    """Two variants trained under ``seeds``, with their curves and held-out losses."""
    runs, variants = {}, []
    for i, variant in enumerate(("vanilla", "mesh")):
        losses = [5.0 - 0.2 * i + 0.01 * k for k, _ in enumerate(seeds)]
        for seed, loss in zip(seeds, losses):
            runs[f"{variant}-s{seed}"] = {
                "variant": variant, "seed": seed, "tokens_per_iteration": 1024,
                "train": {str(s): 6.0 - 0.1 * s - 0.2 * i for s in range(1, 9)},
                "valid": {"4": 5.5 - 0.2 * i, "8": 5.2 - 0.2 * i}, "heldout": {"mean_nll": loss}}
        mean = sum(losses) / len(losses)
        std = (sum((x - mean) ** 2 for x in losses) / len(losses)) ** 0.5
        variants.append({"variant": variant, "layout": "8" if i == 0 else "2+2R2+2",
                         "state_scheme": variant, "params": 2e6, "non_embedding_params": 1e6 + i,
                         "seeds": list(seeds), "heldout_loss": {"mean": mean, "std": std},
                         "perplexity": {"mean": 100.0 + i, "std": 0.5 * (len(seeds) > 1)},
                         "heldout_tokens": 5000, "delta_loss": mean - 5.0 - 0.01 * (len(seeds) - 1) / 2,
                         "delta_perplexity": float(i), "non_embedding_change": 1e-6 * i})
    out = {"baseline": "vanilla", "variants": variants, "runs": runs}
    out["by_seed"] = by_seed(out)
    return out


def rows(text, start):
    return [line for line in text.splitlines() if line.startswith(start)]


def test_one_seed_shows_values_not_a_zero_spread():
    text = markdown(results([1234]))
    assert "±" not in text
    assert rows(text, "| variant | layout")[0].endswith("| n (seeds) |")
    mesh = rows(text, "| mesh | 2+2R2+2")[0]
    assert mesh.startswith("| mesh | 2+2R2+2 | mesh | 2.00M | 1.00M (+0.0%) | 4.8000 | 101.000 |")
    assert mesh.endswith("| 1 |")
    assert rows(text, "| variant | loss s1234")[0].endswith("| paired Δ loss vs vanilla |")
    assert rows(text, "| mesh | 4.8000")[0] == "| mesh | 4.8000 | 1 | 1.00 | -0.2000 |"


def test_several_seeds_show_mean_and_spread():
    text = markdown(results([1, 2]))
    assert "| 4.8050 ± 0.0050 | 101.000 ± 0.500 |" in rows(text, "| mesh | 2+2R2+2")[0]
    assert rows(text, "| mesh | 4.8000")[0] == \
        "| mesh | 4.8000 | 4.8100 | 1 1 | 1.00 | -0.2000 ± 0.0000 [-0.2000, -0.2000] |"


def test_curves_legend_is_below_the_panels():
    fig = curves_figure(results([1, 2]))
    assert all(ax.get_legend() is None for ax in fig.axes)
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["vanilla (8)", "mesh (2+2R2+2)"]
    fig.canvas.draw()
    assert all(legend.get_window_extent().y1 <= ax.get_window_extent().y0 for ax in fig.axes)
