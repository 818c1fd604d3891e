"""Tests of megatron_mesh.probing.metrics: update magnitude, linear/RBF CKA, normalized spectra."""

import math

import numpy as np
import pytest
import torch

from megatron_mesh.probing.metrics import (
    cka_matrix,
    gram_cka,
    linear_cka,
    normalized_spectrum,
    rbf_cka,
    update_magnitude,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(n, seed=0):
    q, _ = torch.linalg.qr(randn(n, n, seed=seed))
    return q


# ---------------------------------------------------------------- CKA


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_of_identical_inputs_is_one(cka):
    x = randn(20, 7)
    assert abs(cka(x, x).item() - 1) < 1e-12
    assert abs(cka(x.float(), x.clone()).item() - 1) < 1e-12  # fp32 input, float64 output
    assert cka(x, x).dtype == torch.float64


def test_linear_cka_invariances_and_a_non_invariance():
    x, y = randn(32, 8, seed=1), randn(32, 5, seed=2)
    ref = linear_cka(x, y).item()
    assert 0.05 < ref < 0.95
    q = orthogonal(8, seed=3)
    assert abs(linear_cka(x @ q, y).item() - ref) < 1e-12
    assert abs(linear_cka(x, y @ orthogonal(5, seed=4)).item() - ref) < 1e-12
    assert abs(linear_cka(3.7 * x, y).item() - ref) < 1e-12
    assert abs(linear_cka(x, 0.01 * y).item() - ref) < 1e-12
    # An invertible but non-orthogonal map (anisotropic scaling, then a rotation) changes CKA.
    a = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64) ** 2) @ q
    assert abs(linear_cka(x @ a, y).item() - ref) > 1e-2
    assert abs(linear_cka(x @ a, x).item() - 1) > 1e-2


def test_rbf_cka_invariant_to_orthogonal_map_and_isotropic_scaling():
    x, y = randn(24, 6, seed=5), randn(24, 4, seed=6)
    ref = rbf_cka(x, y).item()
    assert abs(rbf_cka(5.0 * x @ orthogonal(6, seed=7), y).item() - ref) < 1e-12


def test_linear_cka_hand_computed():
    # 3x1: x = [0, 1, 2] -> centred [-1, 0, 1]; y = [0, 0, 3] -> centred [-1, -1, 2].
    # y^T x = 1 + 0 + 2 = 3, x^T x = 2, y^T y = 1 + 1 + 4 = 6  ->  CKA = 3^2 / (2 * 6) = 3/4.
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = torch.tensor([[0.0], [0.0], [3.0]])
    assert abs(linear_cka(x, y).item() - 0.75) < 1e-15

    # 4x2 vs 4x1: X = [[2,1],[1,2],[0,1],[1,0]], column means (1, 1) -> Xc = [[1,0],[0,1],[-1,0],[0,-1]].
    # Y = [1,2,3,4]^T, mean 2.5 -> Yc = [-1.5, -0.5, 0.5, 1.5]^T.
    # Xc^T Xc = diag(2, 2), ||.||_F = sqrt(8) = 2 sqrt(2);  Yc^T Yc = 2.25+0.25+0.25+2.25 = 5.
    # Yc^T Xc = [-1.5*1 + 0.5*(-1), -0.5*1 + 1.5*(-1)] = [-2, -2], ||.||_F^2 = 8.
    # CKA = 8 / (2 sqrt(2) * 5) = 2 sqrt(2) / 5 ~= 0.5657.
    x = torch.tensor([[2, 1], [1, 2], [0, 1], [1, 0]])
    y = torch.tensor([[1], [2], [3], [4]])
    assert abs(linear_cka(x, y).item() - 2 * math.sqrt(2) / 5) < 1e-15


def test_linear_cka_feature_form_equals_gram_form():
    x, y = randn(40, 6, seed=8), randn(40, 9, seed=9)
    assert abs(linear_cka(x, y).item() - gram_cka(x @ x.T, y @ y.T).item()) < 1e-12
    # n < d too (the feature form is then the more expensive one, but must agree).
    x, y = randn(5, 12, seed=10), randn(5, 3, seed=11)
    assert abs(linear_cka(x, y).item() - gram_cka(x @ x.T, y @ y.T).item()) < 1e-12


def naive_rbf_cka(x, y, threshold):
    """Kornblith et al.'s RBF CKA written out literally: loops for the Gram, np.median, explicit H."""
    n = x.shape[0]

    def gram(a):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                d[i, j] = np.sum((a[i] - a[j]) ** 2)
        return np.exp(-d / (2 * threshold**2 * np.median(d)))

    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ gram(x) @ h, h @ gram(y) @ h
    return np.sum(kx * ky) / (np.linalg.norm(kx) * np.linalg.norm(ky))


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("n", [10, 11])  # n*n even and odd: np.median's two conventions
def test_rbf_cka_matches_naive_kornblith(threshold, n):
    x, y = randn(n, 5, seed=12), randn(n, 3, seed=13)
    y = y + 0.5 * x[:, :3]  # correlated so the value is not near 0
    expected = naive_rbf_cka(x.numpy(), y.numpy(), threshold)
    assert abs(rbf_cka(x, y, threshold).item() - expected) < 1e-10


def test_rbf_cka_bandwidth_uses_median_including_diagonal():
    # Wrong conventions (median without the diagonal, torch.median's lower median) give other values.
    x, y = randn(10, 5, seed=14), randn(10, 3, seed=15)
    got = rbf_cka(x, y).item()
    xn, yn = x.numpy(), y.numpy()
    d = lambda a: ((a[:, None] - a[None]) ** 2).sum(-1)  # noqa: E731
    off = ~np.eye(10, dtype=bool)

    def cka_with(mx, my):
        kx, ky = np.exp(-d(xn) / (2 * mx)), np.exp(-d(yn) / (2 * my))
        return gram_cka(torch.from_numpy(kx), torch.from_numpy(ky)).item()

    assert abs(got - cka_with(np.median(d(xn)), np.median(d(yn)))) < 1e-12
    assert abs(got - cka_with(np.median(d(xn)[off]), np.median(d(yn)[off]))) > 1e-6


@pytest.mark.parametrize("kind", ["linear", "rbf"])
def test_cka_matrix(kind):
    base = randn(16, 6, seed=16)
    states = [base, base + 0.3 * randn(16, 6, seed=17), randn(16, 4, seed=18), base.float() @ orthogonal(6).float()]
    c = cka_matrix(states, kind=kind, threshold=0.8)
    pair = linear_cka if kind == "linear" else lambda a, b: rbf_cka(a, b, threshold=0.8)
    assert c.shape == (4, 4) and c.dtype == torch.float64
    assert torch.equal(c, c.T)
    assert torch.allclose(c.diagonal(), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    for i in range(4):
        for j in range(4):
            assert abs(c[i, j].item() - pair(states[i], states[j]).item()) < 1e-12


# ---------------------------------------------------------------- update magnitude


def test_update_magnitude_known_values():
    h = randn(6, 5, seed=19)
    r = randn(6, 5, seed=20)
    g = r - (r * h).sum() / (h * h).sum() * h  # Frobenius-orthogonal to h ...
    g = g * h.norm() / g.norm()  # ... with the same norm
    cases = [(h, 0.0), (-h, 2.0), (2 * h, 2 / 3), (torch.zeros_like(h), 2.0), (g, math.sqrt(2))]
    for f_h, expected in cases:
        assert abs(update_magnitude(h, f_h).item() - expected) < 1e-12
    batched = update_magnitude(h.expand(5, 6, 5), torch.stack([f for f, _ in cases]))  # [5, s, d] -> [5]
    assert batched.shape == (5,)
    assert torch.allclose(batched, torch.tensor([e for _, e in cases], dtype=torch.float64), atol=1e-12)
    assert update_magnitude(randn(2, 3, 6, 5), randn(2, 3, 6, 5, seed=1)).shape == (2, 3)


# ---------------------------------------------------------------- normalized spectrum


def matrix_with_spectrum(sigma, s, seed):
    d = len(sigma)
    u = orthogonal(s, seed=seed)[:, :d]  # [s, d], orthonormal columns
    v = orthogonal(d, seed=seed + 1)
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def test_normalized_spectrum_known_sigma():
    sigma = [10.0, 5.0, 3.0, 1.0, 0.5, 0.1]
    h = matrix_with_spectrum(sigma, 9, seed=21)  # [9, 6]
    got = normalized_spectrum(h)
    assert got.shape == (6,)  # k = 50 > min(s, d) = 6: all 6 values
    assert torch.allclose(got, torch.tensor(sigma, dtype=torch.float64) / 10, rtol=0, atol=1e-12)
    assert got[0].item() == 1.0
    assert normalized_spectrum(h, k=3).shape == (3,)
    assert normalized_spectrum(h.T).shape == (6,)  # [6, 9]


def test_normalized_spectrum_rank_deficient_and_batched():
    h = matrix_with_spectrum([4.0, 3.0, 2.0, 0.0, 0.0, 0.0], 8, seed=22)  # rank 3
    got = normalized_spectrum(h)
    assert torch.allclose(got[:3], torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64), atol=1e-12)
    assert got[3:].abs().max().item() < 1e-12
    batch = torch.stack([h, randn(8, 6, seed=23), randn(8, 6, seed=24)])  # [3, 8, 6]
    out = normalized_spectrum(batch, k=4)
    assert out.shape == (3, 4)
    for i in range(3):
        assert torch.allclose(out[i], normalized_spectrum(batch[i], k=4), atol=1e-12)
    assert normalized_spectrum(batch.to(torch.bfloat16)).dtype == torch.float64


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cka", [linear_cka, rbf_cka])
def test_cka_errors(cka):
    with pytest.raises(ValueError, match=r"\(5, 3\) and \(6, 3\)"):
        cka(randn(5, 3), randn(6, 3))
    with pytest.raises(ValueError, match="at least 2 rows"):
        cka(randn(1, 3), randn(1, 3))
    with pytest.raises(ValueError, match="constant"):
        cka(torch.ones(5, 3), randn(5, 3))
    with pytest.raises(ValueError, match="constant"):
        cka(randn(5, 3), torch.full((5, 2), 7.0))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        cka(randn(5), randn(5))


def test_other_errors():
    with pytest.raises(ValueError, match="threshold"):
        rbf_cka(randn(5, 3), randn(5, 3, seed=1), threshold=0.0)
    x = torch.cat([torch.zeros(4, 3), torch.ones(1, 3)])  # 17 of the 25 squared distances are 0
    with pytest.raises(ValueError, match="median squared distance is 0"):
        rbf_cka(x, randn(5, 3))
    with pytest.raises(ValueError, match=r"\(5, 3\) and \(6, 3\)"):
        cka_matrix([randn(5, 3), randn(6, 3)])
    with pytest.raises(ValueError, match="constant"):
        cka_matrix([randn(5, 3), torch.ones(5, 3)], kind="linear")
    with pytest.raises(ValueError, match="kind"):
        cka_matrix([randn(5, 3)], kind="cosine")
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(3, 4\)"):
        update_magnitude(randn(4, 3), randn(3, 4))
    with pytest.raises(ValueError, match="k must be"):
        normalized_spectrum(randn(4, 3), k=0)
    with pytest.raises(ValueError, match="all zeros"):
        normalized_spectrum(torch.zeros(2, 4, 3))
