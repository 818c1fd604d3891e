"""Depth study: the t-loop read-outs, the coda lens (which must reproduce them) and the direct
lens, and which models may loop beyond the trained K."""

import pytest
import torch

from test_perplexity import L, SECTION


def loaded_model(scheme, layout="1+2R2+1", seed=0, **model):
    """A randomly initialised model as load_model returns it (routers perturbed off uniform)."""
    from megatron_mesh.evaluation.loading import LoadedModel
    from megatron_mesh.hf.importer import build_model

    section = dict(SECTION, layout=layout, state_scheme=scheme, **model)
    model = build_model(section, {}, ("",), seed).eval()
    with torch.no_grad():
        for p in model.decoder.scheme.parameters() if model.decoder.scheme else []:
            p.normal_(0.0, 0.5)
    return LoadedModel(model, section, f"tiny-{scheme}", None)


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
