"""Pure math of the paper's three representation probes (Sec. 2 and 4.1, Figures 3, 4, 5).

Conventions:
- A hidden state of one sample is a matrix h in R^{seq x dim}: rows are examples (the sample's
  tokens), columns are features. CKA is computed per sample between two states' [seq, dim]
  matrices; averaging over samples is the caller's job.
- Everything is computed in float64 (inputs may be fp32/bf16); results are float64 tensors.
- Update magnitude (Fig. 3): 2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F) per [seq, dim] matrix.
- CKA (Fig. 4; Kornblith et al. 2019) with the biased HSIC estimator, as in their reference code:
  CKA(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F), H = I - 11^T / n.
  Linear kernel: K = X X^T, computed in the equivalent feature-space form
  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y.
  RBF kernel: K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = threshold * sqrt(m), where m is
  the median of ALL n*n entries of the pairwise squared-distance matrix, zero diagonal included
  (np.median semantics: the mean of the two middle values when n*n is even). This is Kornblith's
  `gram_rbf(x, threshold)`: exp(-D / (2 threshold^2 np.median(D))). Squared distances come from
  the Gram trick |x_i|^2 + |x_j|^2 - 2 x_i.x_j, clamped at 0 (the diagonal is exactly 0).
- Normalized spectrum (Fig. 5): singular values of the UNcentred state matrix (the paper does not
  centre), largest first, divided by the largest.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def update_magnitude(h: Tensor, f_h: Tensor) -> Tensor:
    """2 ||f(h) - h||_F / (||f(h)||_F + ||h||_F) over the last two dims ([..., s, d] -> [...]).

    0 when f(h) = h, 2 when f(h) = -h or f(h) = 0; NaN where h and f(h) are both zero.
    """
    if h.shape != f_h.shape or h.dim() < 2:
        raise ValueError(f"h and f(h) need the same [..., s, d] shape, got {tuple(h.shape)} "
                         f"and {tuple(f_h.shape)}")
    h, f_h = h.double(), f_h.double()
    fro = torch.linalg.matrix_norm  # Frobenius over the last two dims: [..., s, d] -> [...]
    return 2 * fro(f_h - h) / (fro(f_h) + fro(h))


def _check_state(x: Tensor, name: str = "x") -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be a [n, d] matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (examples) for CKA, got shape {tuple(x.shape)}")
    if bool((x == x[:1]).all()):
        raise ValueError(f"{name} is constant (all rows equal): its centred Gram matrix is zero "
                         "and CKA is 0/0")
    return x.double()


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() == 2 and y.dim() == 2 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows (examples), got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return _check_state(x, "x"), _check_state(y, "y")


def _centre_gram(k: Tensor) -> Tensor:
    """H K H for H = I - 11^T/n, without forming H."""  # [n, n] -> [n, n]
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def gram_cka(kx: Tensor, ky: Tensor) -> Tensor:
    """CKA of two (uncentred) [n, n] Gram matrices K, L: <HKH, HLH>_F / (||HKH||_F ||HLH||_F)."""
    kx, ky = _centre_gram(kx.double()), _centre_gram(ky.double())
    return (kx * ky).sum() / (kx.norm() * ky.norm())


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of x [n, d1] and y [n, d2] (rows = examples) -> scalar float64 tensor."""
    x, y = _check_pair(x, y)
    x, y = x - x.mean(0), y - y.mean(0)  # column-centred, [n, d1] / [n, d2]
    return (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())


def rbf_gram(x: Tensor, threshold: float = 1.0) -> Tensor:
    """Kornblith's gram_rbf: exp(-D / (2 threshold^2 median(D))), D the [n, n] squared distances."""
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    x = _check_state(x)
    sq_norms = x.square().sum(1)  # [n]
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * x @ x.T).clamp_min(0)  # [n, n]
    v = sq_dist.flatten().sort().values  # np.median over all n*n entries, diagonal included
    median = (v[(v.numel() - 1) // 2] + v[v.numel() // 2]) / 2
    if median == 0:
        raise ValueError("median squared distance is 0 (over half of the row pairs coincide): "
                         "the RBF bandwidth would be 0")
    return torch.exp(-sq_dist / (2 * threshold**2 * median))  # [n, n]


def rbf_cka(x: Tensor, y: Tensor, threshold: float = 1.0) -> Tensor:
    """RBF-kernel CKA of x [n, d1] and y [n, d2] (rows = examples) -> scalar float64 tensor."""
    x, y = _check_pair(x, y)
    return gram_cka(rbf_gram(x, threshold), rbf_gram(y, threshold))


def cka_matrix(states: Sequence[Tensor], kind: str = "rbf", threshold: float = 1.0) -> Tensor:
    """Pairwise CKA between states (each [n, d_i], same n) -> [m, m] symmetric float64 matrix.

    Each state's centred, normalised Gram matrix is computed once; entry (i, j) equals
    linear_cka / rbf_cka(states[i], states[j]) up to rounding, and the diagonal is 1.
    """
    if kind not in ("linear", "rbf"):
        raise ValueError(f"kind must be 'linear' or 'rbf', got {kind!r}")
    states = [_check_state(s, f"states[{i}]") for i, s in enumerate(states)]
    for i, s in enumerate(states[1:], 1):
        if s.shape[0] != states[0].shape[0]:
            raise ValueError(f"states need the same number of rows (examples), got shapes "
                             f"{tuple(states[0].shape)} and {tuple(s.shape)} (states[{i}])")
    grams = [_centre_gram(s @ s.T if kind == "linear" else rbf_gram(s, threshold)) for s in states]
    flat = torch.stack([g.flatten() / g.norm() for g in grams])  # [m, n*n]
    c = flat @ flat.T  # [m, m]
    return (c + c.T) / 2


def normalized_spectrum(h: Tensor, k: int = 50) -> Tensor:
    """Top singular values of the uncentred state, sigma_i / sigma_0 for i < k: [..., s, d] -> [..., r].

    r = min(k, s, d): when fewer than k singular values exist, all min(s, d) are returned (no
    padding). Values are in descending order and the first is 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if h.dim() < 2:
        raise ValueError(f"h must be [..., s, d], got shape {tuple(h.shape)}")
    sigma = torch.linalg.svdvals(h.double())[..., :k]  # [..., r], descending
    if bool((sigma[..., 0] == 0).any()):
        raise ValueError("a state matrix is all zeros: its spectrum cannot be normalized")
    return sigma / sigma[..., :1]
