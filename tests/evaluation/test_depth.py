"""Depth study: the t-loop read-outs, the coda lens (which must reproduce them) and the direct
lens, and which models may loop beyond the trained K."""

import pytest
import torch

from test_perplexity import L, SECTION


def loaded_model(scheme, layout="1+2R2+1", seed=0, **model):
    """A randomly initialised model as load_model returns it (routers perturbed off uniform)."""
    from megatron_mesh.checkpoint.reader import build_model
    from megatron_mesh.config.model import MeshConfig
    from megatron_mesh.evaluation.loading import LoadedModel

    config = MeshConfig.from_section(dict(SECTION, layout=layout, state_scheme=scheme, **model))
    model = build_model(config, {}, ("",), seed).eval()
    with torch.no_grad():
        for p in model.decoder.scheme.parameters() if model.decoder.scheme else []:
            p.normal_(0.0, 0.5)
    return LoadedModel(model, f"tiny-{scheme}", None)


def documents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (2 * L + 9, 20, L + 1, 45)]


def plain_mean_loss(model, docs):
    """Mean next-token loss of the normal forward (no num_loops) over the same windows."""
    from megatron_mesh.evaluation.perplexity import windows

    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            for inputs, labels in windows(doc, L):
                tokens, positions = torch.tensor([inputs]), torch.arange(len(inputs))[None]
                total += model(tokens, positions, labels=torch.tensor([labels])).double().sum().item()
                count += len(labels)
    return total / count


def test_read_out_and_coda_lens_agree_with_the_model():
    from megatron_mesh.evaluation.depth import study

    loaded = loaded_model("mesh")
    report = study(loaded, documents(), L, batch_size=2)
    rows = report["rows"]
    assert [r["t"] for r in rows] == [0, 1, 2] and report["trained_loops"] == 2
    assert report["tokens"] == sum(len(d) - 1 for d in documents())
    assert rows[-1]["read_out_loss"] == pytest.approx(plain_mean_loss(loaded.model, documents()), rel=1e-6)
    for r in rows:
        assert r["coda_lens_loss"] == pytest.approx(r["read_out_loss"], rel=1e-5), r["t"]
    # the direct lens skips the coda layer: a different read-out of the same states
    assert all(abs(r["direct_lens_loss"] - r["coda_lens_loss"]) > 1e-4 for r in rows)
    # fewer loops give a different model: the read-outs are not all one number
    assert len({round(r["read_out_loss"], 6) for r in rows}) == 3


@pytest.mark.parametrize("scheme, model", [
    ("base", {}), ("anchor", {}), ("mesh_shared", {}), ("diagonal_injection", {}),
    ("linear_injection", {"initial_state": "random", "initial_state_std": 0.6}),
])
def test_tied_schemes_without_per_step_parameters_loop_further(scheme, model):
    """Beyond K; the lenses read h(t) through the injection schemes' readout, and a random x(0)
    is the same in every forward of the study (else the coda lens would not equal the read-out)."""
    from megatron_mesh.evaluation.depth import study

    report = study(loaded_model(scheme, **model), documents()[:2], L, max_loops=3)
    assert [r["t"] for r in report["rows"]] == [0, 1, 2, 3] and report["max_loops"] == 3
    beyond = report["rows"][3]
    assert beyond["coda_lens_loss"] == pytest.approx(beyond["read_out_loss"], rel=1e-5)


def test_mesh_and_vanilla_refuse():
    from megatron_mesh.evaluation.depth import study

    with pytest.raises(ValueError, match=r"tiny-mesh: --max-loops 3 is not possible for layout "
                                         r"'1\+2R2\+1' with state_scheme 'mesh' \(trained K=2"):
        study(loaded_model("mesh"), documents(), L, max_loops=3)
    with pytest.raises(ValueError, match="tiny-vanilla: layout '3' .* has no loop"):
        study(loaded_model("vanilla", layout="3"), documents(), L)


class Recorder:
    """A progress reporter that keeps what it was told."""

    def __init__(self):
        self.events = []

    def note(self, message):
        self.events.append(("note", message))

    def start(self, task, total=None, unit="documents"):
        self.events.append(("start", task, total, unit))

    def update(self, done, tokens=0):
        self.events.append(("update", done, tokens))

    def finish(self, done, tokens=0):
        self.events.append(("finish", done, tokens))


def test_study_reports_progress_per_batch():
    from megatron_mesh.evaluation.depth import study

    recorder, docs = Recorder(), documents()
    report = study(loaded_model("mesh"), docs, L, batch_size=2, source="data/valid_text_document",
                   progress=recorder, total_documents=len(docs))
    start, *updates, finish = recorder.events
    assert start == ("start", "tiny-mesh on valid_text_document, t = 0..2", 4, "documents")
    assert updates and all(kind == "update" for kind, *_ in updates)
    assert [tokens for *_, tokens in updates] == sorted(tokens for *_, tokens in updates)
    assert finish == ("finish", 4, report["tokens"])


def test_figure_keeps_equal_curves_visible_and_the_legend_off_the_data():
    from megatron_mesh.evaluation.depth import depth_figure, study

    report = study(loaded_model("mesh"), documents(), L, batch_size=2, source="data/valid_text_document")
    report["model"] = "demo"
    fig = depth_figure(report)
    left, right = fig.axes
    assert fig.get_suptitle() == f"demo (1+2R2+1, mesh): {report['tokens']:,} tokens of valid_text_document"
    # the coda lens equals the read-out: it says so and is drawn differently, on top
    read_out, coda = left.get_lines()[:2]
    assert (read_out.get_label(), coda.get_label()) == ("read-out", "coda lens (= read-out)")
    assert read_out.get_marker() != coda.get_marker() and read_out.get_linestyle() != coda.get_linestyle()
    assert coda.get_zorder() > read_out.get_zorder()
    assert [line.get_label() for line in right.get_lines()][:2] == ["read-out", "direct lens"]
    # losses on a linear axis, as they are (no offset), each panel scaled to its own curves
    for ax in (left, right):
        assert ax.get_yscale() == "linear" and ax.get_ylabel() == "loss (nats/token)"
        assert ax.get_legend() is None  # one figure legend below the panels instead
    low, high = left.get_ylim()
    losses = [r["read_out_loss"] for r in report["rows"]]
    assert low <= min(losses) and max(losses) <= high and high - low < 2 * (max(losses) - min(losses))
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "read-out", "coda lens (= read-out)", "trained K = 2", "direct lens"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in (left, right))  # below the axes


def test_perplexity_reports_progress_under_the_given_name():
    from megatron_mesh.evaluation.perplexity import evaluate, megatron_scorer

    recorder, docs = Recorder(), documents()
    scorer = megatron_scorer(loaded_model("mesh"), "cpu", name="demo")
    result = evaluate(scorer, docs, L, batch_size=2, max_documents=3, source="valid.jsonl",
                      progress=recorder, total_documents=len(docs))
    start, *updates, finish = recorder.events
    assert start == ("start", "demo on valid.jsonl", 3, "documents")  # capped by max_documents
    assert updates[-1] == ("update", 3, result.tokens)
    assert finish == ("finish", 3, result.tokens)
