"""Probe aggregation: per-sample numbers are the metrics of the recorded states, with the right
labels and shapes for MeSH (K = 2) and vanilla layouts."""

from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config

SEQ, SAMPLES = 24, 3


def loaded(layout, scheme):
    """A random tiny model as ``load_model`` would return it."""
    from megatron_mesh.model.gpt import MeshGPTModel

    config = tiny_config(layout, scheme)
    torch.manual_seed(0)
    model = MeshGPTModel(config).eval()
    return SimpleNamespace(model=model, config=config, name=f"{scheme}-model", tokenizer=None)


def samples(vocab=96):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (SAMPLES, SEQ), generator=g).tolist()


def recorded_states(model, sample):
    tokens = torch.tensor([sample])
    states = []
    with torch.no_grad():
        model(tokens, torch.arange(SEQ).unsqueeze(0), states=states)
    return {name: h[:, 0] for name, h in states}  # [s, h]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_per_sample_numbers_are_the_metrics_of_the_recorded_states(batch_size, megatron_world):
    from megatron_mesh.probing import metrics
    from megatron_mesh.probing.probe import probe_model

    model = loaded("1+2R2+1", "mesh")
    data = samples()
    probe = probe_model(model, data, threshold=0.8, batch_size=batch_size)
    for i, sample in enumerate(data):
        s = recorded_states(model.model, sample)
        blocks = [(s["h_emb"], s["prelude"]), (s["h0"], s["core0"]), (s["h1"], s["core1"]),
                  (s["h2"], s["coda"])]
        want = torch.stack([metrics.update_magnitude(x, y) for x, y in blocks])
        # batched and single-sample fp32 forwards differ by rounding only
        torch.testing.assert_close(probe.per_sample["update_magnitude"][i], want, rtol=1e-5, atol=1e-6)
        states = [s[k] for k in ("h_emb", "h0", "h1", "h2", "coda")]
        for kind in ("rbf", "linear"):
            torch.testing.assert_close(probe.per_sample[f"cka_{kind}"][i],
                                       metrics.cka_matrix(states, kind, 0.8), rtol=1e-5, atol=1e-6)
        pair = {"rbf": metrics.rbf_cka(states[0], states[2], 0.8), "linear": metrics.linear_cka(states[0], states[2])}
        for kind, value in pair.items():  # h_emb vs h(1), by the pairwise functions
            assert float(probe.per_sample[f"cka_{kind}"][i, 0, 2]) == pytest.approx(float(value), rel=1e-5)
        spectrum = torch.stack([metrics.normalized_spectrum(h, 50) for h in states])
        torch.testing.assert_close(probe.per_sample["spectrum"][i], spectrum, rtol=1e-5, atol=1e-6)

    summary = probe.summary()
    magnitude = probe.per_sample["update_magnitude"]
    assert summary["update_magnitude"]["mean"] == pytest.approx(magnitude.mean(0).tolist())
    assert summary["update_magnitude"]["std"] == pytest.approx(magnitude.std(0, correction=0).tolist())
    assert summary["cka"]["rbf"]["mean"][1][2] == pytest.approx(float(probe.per_sample["cka_rbf"][:, 1, 2].mean()))
    # the samples differ, so a mean that ignored all but one would be caught
    assert magnitude.std(0).min() > 0


def test_labels_and_shapes_mesh_and_vanilla(megatron_world):
    from megatron_mesh.probing.probe import probe_model

    mesh = probe_model(loaded("1+2R2+1", "mesh"), samples(), path="ckpt/mesh").summary()
    assert mesh["update_magnitude"]["blocks"] == ["prelude", "core 1", "core 2", "coda"]
    assert mesh["cka"]["states"] == ["h_emb", "h(0)", "h(1)", "h(2)", "h_out"]
    assert mesh["spectrum"]["states"] == mesh["cka"]["states"]
    assert (mesh["samples"], mesh["seq_length"], mesh["path"]) == (SAMPLES, SEQ, "ckpt/mesh")
    assert len(mesh["update_magnitude"]["std"]) == 4
    for kind in ("rbf", "linear"):
        assert torch.tensor(mesh["cka"][kind]["mean"]).shape == (5, 5)
        assert torch.tensor(mesh["cka"][kind]["std"]).shape == (5, 5)
        assert torch.tensor(mesh["cka"][kind]["mean"]).diagonal().tolist() == pytest.approx([1.0] * 5)
    assert mesh["spectrum"]["k"] == min(50, SEQ)
    assert torch.tensor(mesh["spectrum"]["mean"]).shape == (5, SEQ)
    routers = mesh["routers"]
    assert [s["label"] for s in routers["steps"]] == ["transition", "step0", "step1"]
    assert routers["tokens"] == SAMPLES * SEQ and routers["buffer_slots"] == 5

    vanilla = probe_model(loaded("3", "vanilla"), samples()).summary()
    assert vanilla["update_magnitude"]["blocks"] == ["stack"]
    assert vanilla["cka"]["states"] == ["h_emb", "h_out"]
    assert torch.tensor(vanilla["spectrum"]["mean"]).shape == (2, SEQ)
    assert vanilla["routers"] is None

    anchor = probe_model(loaded("1+2R2+1", "anchor"), samples()).summary()
    assert anchor["routers"] is None and len(anchor["update_magnitude"]["blocks"]) == 4


def test_figures_have_one_panel_per_model_and_fixed_size(megatron_world, tmp_path):
    from PIL import Image

    from megatron_mesh.probing import figures
    from megatron_mesh.probing.probe import probe_model

    models = [probe_model(loaded("1+2R2+1", s), samples()).summary() for s in ("base", "mesh")]
    models.append(probe_model(loaded("3", "vanilla"), samples()).summary())
    for build in figures.FIGURES.values():
        fig, axes = build(models)
        assert [ax.get_title() for ax in axes] == ["base-model", "mesh-model", "vanilla-model"]
        assert tuple(fig.get_size_inches() * fig.dpi) == pytest.approx(figures.figure_size(3))
    paths = figures.save_all(models, tmp_path)
    for path in paths.values():
        assert Image.open(path).size == figures.figure_size(3) == (1350, 400)


def test_figures_say_what_h0_is(megatron_world):
    """h(0) is the prelude output, MeSH's transitional read or an injection scheme's start x(0)
    (random: not the prelude at all): the CKA caption and the spectrum legend say which."""
    from megatron_mesh.probing import figures
    from megatron_mesh.probing.probe import first_state, probe_model

    random_start = tiny_config(scheme="linear_injection", initial_state="random")
    assert first_state(random_start)["short"] == "random start x(0)"
    assert first_state(tiny_config(scheme="diagonal_injection"))["short"] == "zero start x(0)"
    assert first_state(tiny_config(scheme="anchor*"))["short"] == "prelude output"
    assert first_state(tiny_config("3", "vanilla")) is None
    models = [probe_model(loaded("1+2R2+1", s), samples()).summary() for s in ("base", "mesh")]
    models.append(probe_model(loaded("3", "vanilla"), samples()).summary())
    models[0]["h0"] = first_state(random_start)
    assert models[1]["h0"]["short"] == "transitional read"

    _, axes = figures.cka_figure(models)
    captions = [" ".join(ax.get_xlabel().split()) for ax in axes]
    assert captions[0].startswith("h(0) = the random start x(0), drawn afresh per forward, not the "
                                  "prelude output")
    assert captions[1].startswith("h(0) = the transitional step's read of the MeSH buffer")
    assert captions[2] == "h_out = the coda output before the final norm"  # no loop, no h(0)
    _, axes = figures.spectrum_figure(models)
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert legends == [["h_emb", "h(0) = random start x(0)", "h(1)", "h(2)", "h_out"],
                       ["h_emb", "h(0) = transitional read", "h(1)", "h(2)", "h_out"], ["h_emb", "h_out"]]
    for ax in axes:  # below the panel, not over the curves
        assert ax.get_legend().get_bbox_to_anchor().y1 < ax.get_window_extent().y0
