"""Linear-algebra kernels behind the NMTune terms.

This module knows nothing about losses. It turns a stack of feature matrices
``z`` of shape ``(..., M, D)`` into the two statistics the regularizers need:

* the singular values of ``z`` (uncentred), and
* the off-diagonal energy ``sum_{i != j} C_ij**2`` of the sample covariance
  ``C = (z - mean)^T (z - mean) / (M - 1)``.

Both come from **one** Gram product on the smaller side of ``z``:

* ``M < D``: ``G = z z^T`` (``M x M``). The singular values are
  ``sqrt(eigvalsh(G))``. The centred Gram ``Kc = H G H`` (``H`` the centring
  projector) follows from ``G`` in ``O(M^2)``, and
  ``||C||_F^2 = ||Kc||_F^2 / (M - 1)^2`` because ``C`` and ``Kc / (M - 1)``
  share their non-zero eigenvalues. The diagonal of ``C`` is a column
  reduction of ``z``. No ``D x D`` matrix is ever formed.
* ``M >= D``: ``G = z^T z`` (``D x D``); the centred scatter is
  ``G - M mean mean^T`` and ``C`` is read off directly.

The Gram product runs in float64 by default: a float32 Gram matrix squares
the condition number and loses every singular value below about
``sqrt(eps_32) * sigma_1 ~ 3e-4 sigma_1``. ``precision="float32"`` trades
that accuracy for speed. Inputs in half precision are upcast with autocast
disabled; callers cast results back to the input dtype.

The Gram product has a hand-written backward (one matmul instead of the two
autograd would run for ``z @ z.mT``), and the square root of the eigenvalues
is guarded with ``torch.where`` so that zero or numerically-zero singular
values get a zero (sub)gradient instead of ``1 / (2 sqrt(0))``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Precision = Literal["float32", "float64"]
PRECISIONS: tuple[str, ...] = ("float32", "float64")

__all__: list[str] = []  # private module


class SpectralStats(NamedTuple):
    """Statistics of a feature stack ``(..., M, D)`` in the compute dtype.

    Attributes:
        singular_values: ``(..., min(M, D))`` in descending order, or ``None``.
        offdiag_energy: ``(...)``, ``sum_{i != j} C_ij**2``, or ``None``.
    """

    singular_values: Tensor | None
    offdiag_energy: Tensor | None


def compute_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the decompositions run in: never below the input's."""
    if precision == "float64" or dtype == torch.float64:
        return torch.float64
    return torch.float32


def upcast(x: Tensor, precision: str) -> Tensor:
    """``x`` in the compute dtype (a no-op when it already is)."""
    return x.to(compute_dtype(x.dtype, precision))


class _SymmetricGram(torch.autograd.Function):
    """``x x^T`` (``rows=True``) or ``x^T x`` with a one-matmul backward."""

    @staticmethod
    def forward(x: Tensor, rows: bool) -> Tensor:  # type: ignore[override]
        return x @ x.mT if rows else x.mT @ x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        x, rows = inputs
        ctx.save_for_backward(x)
        ctx.rows = rows

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        sym = grad + grad.mT
        return (sym @ x if ctx.rows else x @ sym), None


def gram(x: Tensor, rows: bool) -> Tensor:
    """Symmetric Gram product of ``x`` on its rows (``x x^T``) or columns."""
    return _SymmetricGram.apply(x, rows)


def eigen_singular_values(g: Tensor) -> Tensor:
    """Singular values from the eigenvalues of a Gram matrix, descending.

    Eigenvalues below ``n * eps * lambda_max`` are rounding noise of the
    eigensolver: they map to exactly zero with zero gradient (no host sync,
    no ``1 / sqrt(0)``).
    """
    lam = torch.linalg.eigvalsh(g).flip(-1)
    n = g.shape[-1]
    tol = lam[..., :1].clamp_min(0) * (n * torch.finfo(lam.dtype).eps)
    positive = lam > tol
    return torch.where(positive, torch.sqrt(torch.where(positive, lam, 1.0)), 0.0)


def _offdiag_from_rows_gram(g: Tensor, z: Tensor) -> Tensor:
    """Off-diagonal covariance energy from the uncentred ``M x M`` Gram."""
    m = z.shape[-2]
    row_mean = g.mean(dim=-1, keepdim=True)  # (..., M, 1)
    total_mean = row_mean.mean(dim=-2, keepdim=True)  # (..., 1, 1)
    centred = g - row_mean - row_mean.mT + total_mean  # H G H
    zc = z - z.mean(dim=-2, keepdim=True)
    diag = zc.square().sum(dim=-2)  # (..., D) = (M - 1) C_dd
    energy = centred.square().sum(dim=(-2, -1)) - diag.square().sum(dim=-1)
    return energy / (m - 1) ** 2


def _offdiag_from_cols_gram(g: Tensor, z: Tensor) -> Tensor:
    """Off-diagonal covariance energy from the uncentred ``D x D`` Gram."""
    m = z.shape[-2]
    mean = z.mean(dim=-2)  # (..., D)
    scatter = g - m * (mean.unsqueeze(-1) * mean.unsqueeze(-2))
    diag = scatter.diagonal(dim1=-2, dim2=-1)
    energy = scatter.square().sum(dim=(-2, -1)) - diag.square().sum(dim=-1)
    return energy / (m - 1) ** 2


def _offdiag_centred(z: Tensor) -> Tensor:
    """Off-diagonal covariance energy when no spectrum is needed.

    Centring first avoids the cancellation of the shared-Gram formulas, at no
    extra cost since only one Gram product is formed either way.
    """
    m, d = z.shape[-2], z.shape[-1]
    zc = z - z.mean(dim=-2, keepdim=True)
    diag = zc.square().sum(dim=-2)
    rows = m < d
    k = gram(zc, rows)
    energy = k.square().sum(dim=(-2, -1)) - diag.square().sum(dim=-1)
    return energy / (m - 1) ** 2


def spectral_stats(
    z: Tensor,
    *,
    precision: str = "float64",
    singular_values: bool = True,
    covariance: bool = True,
    normalize_rows: bool = False,
) -> SpectralStats:
    """Singular values and covariance off-diagonal energy of ``z``.

    Args:
        z: ``(..., M, D)`` floating tensor with ``M >= 2`` (validated by callers).
        precision: ``"float64"`` (default, accurate) or ``"float32"`` (fast).
        singular_values: Compute the singular values.
        covariance: Compute the off-diagonal covariance energy.
        normalize_rows: L2-normalise each row before the spectrum (the
            authors' analysis convention); does not affect the covariance.

    Returns:
        :class:`SpectralStats` in the compute dtype.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        x = upcast(z, precision)
        if not singular_values:
            return SpectralStats(None, _offdiag_centred(x) if covariance else None)
        m, d = x.shape[-2], x.shape[-1]
        rows = m < d
        if normalize_rows:
            s = _normalize_rows(x)
            sigma = eigen_singular_values(gram(s, rows))
            offdiag = _offdiag_centred(x) if covariance else None
            return SpectralStats(sigma, offdiag)
        g = gram(x, rows)
        sigma = eigen_singular_values(g)
        offdiag = None
        if covariance:
            offdiag = (_offdiag_from_rows_gram if rows else _offdiag_from_cols_gram)(g, x)
        return SpectralStats(sigma, offdiag)


def _normalize_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero with zero gradient."""
    sq = x.square().sum(dim=-1, keepdim=True)
    nonzero = sq > 0
    return torch.where(nonzero, x * torch.rsqrt(torch.where(nonzero, sq, 1.0)), 0.0)


normalize_rows = _normalize_rows
