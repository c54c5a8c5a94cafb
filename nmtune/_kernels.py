"""The formulas behind the NMTune terms, unchecked: statistics of the features, functions of them.

Nothing here validates its input (:mod:`nmtune.functional` does, once, at the public
entry points). It turns a stack of feature matrices ``z`` of shape ``(..., M, D)`` into
the two statistics the regularizers need:

* the singular values of ``z`` (uncentred), and
* the off-diagonal energy ``sum_{i != j} C_ij**2`` of the sample covariance
  ``C = (z - mean)^T (z - mean) / (M - 1)``;

and the singular values into the normalised spectrum ``p = sigma / sum sigma`` and its
functions (the ``L_SVD`` ratio, SVE, LSVR). Both statistics come from **one** Gram
product on the smaller side of ``z``:

* ``M < D``: ``G = z z^T`` (``M x M``). The singular values are
  ``sqrt(eigvalsh(G))``. The centred Gram ``Kc = H G H`` (``H`` the centring
  projector) follows from ``G`` in ``O(M^2)``, and
  ``||C||_F^2 = ||Kc||_F^2 / (M - 1)^2`` because ``C`` and ``Kc / (M - 1)``
  share their non-zero eigenvalues. The diagonal of ``C`` is a column
  reduction of ``z``. No ``D x D`` matrix is ever formed.
* ``M >= D``: ``G = z^T z`` (``D x D``); the centred scatter is
  ``G - M mean mean^T`` and ``C`` is read off directly.

The Gram product runs in float64 by default. Eigenvalues of an ``n x n`` Gram matrix
(``n = min(M, D)``) below ``n * eps * lambda_max`` are rounding noise of the
eigensolver and count as zero (:func:`_resolved`), so the singular values resolved are
those above ``sqrt(n * eps) * sigma_1``: about ``8e-8 sigma_1`` in float64 at ``n = 32``;
with ``precision="float32"`` about ``2e-3 sigma_1`` at ``n = 32`` (a ``32 x 48`` batch)
and ``5.5e-3 sigma_1`` at ``n = 256``, a trade of accuracy for speed. Inputs in half
precision are upcast with autocast disabled; callers cast results back to the input dtype.

When the spectrum is asked for (with or without the covariance), one
``autograd.Function`` (:class:`_GramSpectrum`) computes both statistics with
a fused, hand-written backward: one matmul of the Gram's cost, one ``M^3``
(or ``D^3``) product and two in-place passes over ``(M, D)``, in place of the
extra matmul and the many elementwise passes autograd would record. The
consistency term (:class:`_RowDistance`) and row normalisation have fused
backwards as well. These
functions are differentiable once (``once_differentiable``: a second-order
gradient raises instead of being silently wrong). The square root of the
eigenvalues is guarded with ``torch.where`` so that zero or numerically-zero
singular values get a zero (sub)gradient instead of ``1 / (2 sqrt(0))``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__: list[str] = []  # private module


class SpectralStats(NamedTuple):
    """Statistics of a feature stack ``(..., M, D)`` in the compute dtype.

    Attributes:
        singular_values: ``(..., min(M, D))`` in descending order, or ``None``.
        offdiag_energy: ``(...)``, ``sum_{i != j} C_ij**2``, or ``None``.
    """

    singular_values: Tensor | None
    offdiag_energy: Tensor | None


def autocast_off(x: Tensor) -> torch.autocast:
    """Autocast disabled on ``x``'s device type (a meta tensor, which autocast does not know, uses the CPU's)."""
    return torch.autocast(device_type="cpu" if x.is_meta else x.device.type, enabled=False)


def compute_dtype(dtype: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the decompositions run in: never below the input's."""
    if precision == "float64" or dtype == torch.float64:
        return torch.float64
    return torch.float32


def upcast(x: Tensor, precision: str) -> Tensor:
    """``x`` in the compute dtype (a no-op when it already is)."""
    return x.to(compute_dtype(x.dtype, precision))


def _resolved(lam: Tensor, n: int) -> Tensor:
    """Which eigenvalues of an ``n x n`` Gram matrix (any order) the solver resolves.

    Eigenvalues below ``n * eps * lambda_max`` are rounding noise of the eigensolver: they
    are treated as zero, with zero gradient. In float64 that keeps singular values down to
    ``sqrt(n * eps) * sigma_1`` (about ``2.4e-7 sigma_1`` at ``n = 256``); see docs/method.md
    for the accuracy of each term near that edge.
    """
    top = lam.amax(dim=-1, keepdim=True).clamp_min(0)
    return lam > top * (n * torch.finfo(lam.dtype).eps)


def _safe_sqrt(lam: Tensor, positive: Tensor) -> Tensor:
    """``sqrt(lam)`` where resolved, exactly zero (and zero gradient) elsewhere."""
    return torch.where(positive, torch.sqrt(torch.where(positive, lam, 1.0)), 0.0)


def _eigh(g: Tensor, vectors: bool) -> tuple[Tensor, Tensor | None]:
    """Ascending eigenvalues (and eigenvectors) of the symmetric Gram matrix ``g``.

    LAPACK's convergence failure, which in practice means NaN/Inf features that
    ``check_finite=False`` let through, becomes a ``ValueError`` saying so.
    """
    try:
        return torch.linalg.eigh(g) if vectors else (torch.linalg.eigvalsh(g), None)
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            "the eigendecomposition of the features' Gram matrix failed: the features hold NaN/Inf values "
            "(not checked because check_finite=False) or are too ill-conditioned; check them with "
            f"check_finite=True ({err})"
        ) from err


class _GramSpectrum(torch.autograd.Function):
    """Singular values and covariance off-diagonal energy with one fused backward.

    Forward: one Gram product on the smaller side, ``eigh`` (``eigvalsh`` when
    no gradient is needed) and, if asked, the off-diagonal energy from the
    same Gram. Backward, with ``B = V diag(g_sigma / (2 sigma)) V^T`` and
    ``kappa = g_energy / (M - 1)^2``:

    * ``M < D``: ``grad = (2 B + 4 kappa Kc) x - 4 kappa (x - mean) * diag``
      (``Kc`` the centred ``M x M`` Gram, ``diag`` the column scatter);
    * ``M >= D``: ``grad = x (2 B + 4 kappa S_off) - 4 kappa mean^T S_off``
      (``S_off`` the centred ``D x D`` scatter with its diagonal zeroed).

    That is one matmul of the Gram's cost plus one ``M^3``/``D^3`` product,
    instead of the dozen elementwise passes over ``(M, D)`` autograd would
    record. Inputs arrive in any floating dtype; the work runs in ``dtype``
    and the gradient goes back in the input's dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype, covariance: bool):  # type: ignore[override]
        xc = x.to(dtype)
        m, d = xc.shape[-2], xc.shape[-1]
        rows = m < d
        mean = centred = diag = None
        if covariance:
            # Centre first, then recover the uncentred Gram (for the spectrum) by an exact low-rank
            # correction: deriving the centred statistics from the uncentred Gram instead cancels
            # catastrophically when the rows share a mean far larger than their spread.
            mean = xc.mean(dim=-2, keepdim=True)  # (..., 1, D)
            xc = xc - mean
            centred, diag, energy = centred_energy(xc, rows)
            if rows:
                u = xc @ mean.mT  # (..., M, 1)
                g = centred + u + u.mT + mean.square().sum(dim=-1, keepdim=True)
            else:
                g = centred + m * (mean.mT @ mean)
        else:
            g = xc @ xc.mT if rows else xc.mT @ xc
        need_grad = ctx.needs_input_grad[0]
        lam, vec = _eigh(g, need_grad)
        positive = _resolved(lam, g.shape[-1])
        sigma = _safe_sqrt(lam, positive)
        if not covariance:
            energy = sigma.new_zeros(sigma.shape[:-1])
        if need_grad:
            # xc is the centred input when the covariance is computed (mean holds the shift).
            ctx.save_for_backward(xc, vec, sigma, positive, centred, mean, diag)
        ctx.rows, ctx.covariance, ctx.scale, ctx.in_dtype = rows, covariance, 1.0 / (m - 1) ** 2, x.dtype
        return sigma.flip(-1), energy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_sigma: Tensor, g_energy: Tensor):  # type: ignore[override]
        xc, vec, sigma, positive, centred, mean, diag = ctx.saved_tensors
        gs = g_sigma.to(xc.dtype).flip(-1)  # ascending, like the eigenvalues
        c = torch.where(positive, gs / (2 * torch.where(positive, sigma, 1.0)), 0.0)
        a = 2 * ((vec * c.unsqueeze(-2)) @ vec.mT)
        if not ctx.covariance:
            grad = a @ xc if ctx.rows else xc @ a
            return grad.to(ctx.in_dtype), None, None
        # Here xc = x - mean. The spectral part a @ x (or x @ a) is split exactly into
        # a @ xc + (a 1) mean (or xc @ a + 1 (mean @ a)); the covariance part only sees xc.
        kappa = (4 * ctx.scale) * g_energy.to(xc.dtype)[..., None, None]
        if ctx.rows:
            shift = a.sum(dim=-1, keepdim=True) * mean  # (a 1) mean^T, before a is updated
            a = a + kappa * centred
            grad = a @ xc  # then - kappa * diag * xc + shift, in place: no (M, D) temporaries
            grad.addcmul_(xc, kappa * diag, value=-1.0).add_(shift)
        else:
            shift = mean @ a  # (..., 1, D)
            # S_off = centred minus its diagonal, without a second D x D temporary.
            a = a + kappa * centred
            a.diagonal(dim1=-2, dim2=-1).sub_(kappa[..., 0] * diag)
            grad = (xc @ a).add_(shift)
        return grad.to(ctx.in_dtype), None, None


def centred_energy(xz: Tensor, rows: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The one formula for the covariance's off-diagonal energy ``sum_{i != j} C_ij^2``.

    ``xz`` is the centred input ``(..., M, D)``. Through the smaller Gram matrix:
    ``||C||_F^2`` equals the squared Frobenius norm of the centred ``M x M`` Gram
    (``rows``) or of the ``D x D`` scatter, over ``(M - 1)^2``; the diagonal ``C_ii`` is
    the column scatter either way. Returns ``(gram, column scatter, energy)``.
    """
    if rows:
        gram_c = xz @ xz.mT
        # Column scatter. Not torch.var_mean: its reduction over dim -2 runs ~30x slower
        # on CPU than these passes (3.8 ms against 0.3 ms at 256 x 2048).
        diag = xz.square().sum(dim=-2, keepdim=True)
        energy = gram_c.square().sum(dim=(-2, -1)) - diag.square().sum(dim=(-2, -1))
    else:
        gram_c = xz.mT @ xz
        diag = gram_c.diagonal(dim1=-2, dim2=-1)
        return gram_c, diag, scatter_energy(gram_c, xz.shape[-2])
    return gram_c, diag, energy / (xz.shape[-2] - 1) ** 2


def scatter_energy(scatter: Tensor, rows: int) -> Tensor:
    """``sum_{i != j} C_ij^2`` from the centred ``D x D`` scatter of ``rows`` rows (``C = scatter / (rows - 1)``)."""
    diag = scatter.diagonal(dim1=-2, dim2=-1)
    return (scatter.square().sum(dim=(-2, -1)) - diag.square().sum(dim=-1)) / (rows - 1) ** 2


class Moments(NamedTuple):
    """A row set ``(..., M, D)`` summarised by its mean and its centred ``D x D`` scatter.

    What :func:`nmtune.distributed.global_statistics` all-reduces instead of the rows
    (``distributed_statistics="reduce"``). Every statistic of the regularizers follows:
    ``C = scatter / (M - 1)``, and the uncentred Gram ``z^T z = scatter + M mean^T mean``
    (the exact rank-one correction :class:`_GramSpectrum` uses), whose eigenvalues are the
    squared singular values of the rows.

    Attributes:
        mean: ``(..., 1, D)`` in the compute dtype.
        scatter: ``(..., D, D)``, ``sum_i (z_i - mean)^T (z_i - mean)``, same dtype.
        rows: ``M``, the number of rows summarised.
    """

    mean: Tensor
    scatter: Tensor
    rows: int

    @property
    def shape(self) -> torch.Size:
        """The shape ``(..., M, D)`` of the rows summarised."""
        return torch.Size((*self.scatter.shape[:-2], self.rows, self.scatter.shape[-1]))

    def detach(self) -> Moments:
        return Moments(self.mean.detach(), self.scatter.detach(), self.rows)


def _moment_stats(mom: Moments, singular_values: bool, covariance: bool) -> SpectralStats:
    """:func:`spectral_stats` from :class:`Moments` (plain autograd: every op is ``D x D``).

    The eigenvalues' gradient is ``V diag(g) V^T`` (no eigenvector term), stable under
    repeated eigenvalues; unresolved ones get zero gradient as in :class:`_GramSpectrum`.
    """
    energy = scatter_energy(mom.scatter, mom.rows) if covariance else None
    if not singular_values:
        return SpectralStats(None, energy)
    return SpectralStats(gram_singular_values(mom.scatter + mom.rows * (mom.mean.mT @ mom.mean), mom.rows), energy)


def gram_singular_values(g: Tensor, rows: int) -> Tensor:
    """Descending singular values of ``rows`` rows from their uncentred ``D x D`` Gram ``z^T z``.

    The ``min(rows, D)`` largest, with the eigensolver's rounding noise cut to zero as
    :func:`_resolved` says (used for reduced :class:`Moments` and for spectra accumulated
    a batch at a time).
    """
    lam, _ = _eigh(g, False)
    sigma = _safe_sqrt(lam, _resolved(lam, g.shape[-1])).flip(-1)
    return sigma[..., : min(rows, g.shape[-1])]


def _offdiag_centred(z: Tensor) -> Tensor:
    """Off-diagonal covariance energy when no spectrum is needed (plain autograd)."""
    return centred_energy(z - z.mean(dim=-2, keepdim=True), z.shape[-2] < z.shape[-1])[2]


def spectral_stats(
    z: Tensor | Moments,
    *,
    precision: str = "float64",
    singular_values: bool = True,
    covariance: bool = True,
    normalize_rows: bool = False,
) -> SpectralStats:
    """Singular values and covariance off-diagonal energy of ``z``.

    Args:
        z: ``(..., M, D)`` floating tensor with ``M >= 2`` (validated by callers), or
            the :class:`Moments` of such rows (already in the compute dtype, which
            ``precision`` then does not change; ``normalize_rows`` is not available).
        precision: ``"float64"`` (default, accurate) or ``"float32"`` (fast).
        singular_values: Compute the singular values.
        covariance: Compute the off-diagonal covariance energy.
        normalize_rows: L2-normalise each row before the spectrum (the
            authors' analysis convention); does not affect the covariance.

    Returns:
        :class:`SpectralStats` in the compute dtype.
    """
    if isinstance(z, Moments):
        if normalize_rows:
            raise ValueError("normalize_rows needs the rows themselves, not their Moments")
        with autocast_off(z.mean):
            return _moment_stats(z, singular_values, covariance)
    with autocast_off(z):
        if singular_values and not normalize_rows:
            sigma, energy = _GramSpectrum.apply(z, compute_dtype(z.dtype, precision), covariance)
            return SpectralStats(sigma, energy if covariance else None)
        x = upcast(z, precision)
        energy = _offdiag_centred(x) if covariance else None
        if not singular_values:
            return SpectralStats(None, energy)
        sigma, _ = _GramSpectrum.apply(_normalize_rows(x), x.dtype, False)
        return SpectralStats(sigma, energy)


def normalised_spectrum(sigma: Tensor) -> Tensor:
    """``p_i = sigma_i / sum_j sigma_j``; an all-zero spectrum maps to ``e_1``.

    The zero matrix has no direction; choosing the point mass ``e_1`` keeps
    every function of ``p`` finite, in range (SVE = 0, LSVR = 0, ratio = 1)
    and with zero gradient.
    """
    total = sigma.sum(dim=-1, keepdim=True)
    nonzero = total > 0
    e1 = torch.zeros_like(sigma)
    e1[..., 0] = 1.0
    return torch.where(nonzero, sigma / torch.where(nonzero, total, 1.0), e1)


def svd_loss_of(sigma: Tensor, top_k: int) -> Tensor:
    """``L_SVD = -(1/k) sum_{i<=k} p_i``, ``k = min(top_k, K)``, of descending ``sigma`` ``(..., K)``."""
    k = min(top_k, sigma.shape[-1])
    return -normalised_spectrum(sigma)[..., :k].sum(dim=-1) / k


def sve_of(sigma: Tensor) -> Tensor:
    """Singular value entropy ``-sum_i p_i log p_i`` (``0 log 0 = 0``)."""
    p = normalised_spectrum(sigma)
    positive = p > 0
    # ``0.0 - x`` rather than ``-x``: a point mass gives +0.0, not -0.0.
    return 0.0 - torch.where(positive, p * torch.log(torch.where(positive, p, 1.0)), 0.0).sum(dim=-1)


def lsvr_of(sigma: Tensor) -> Tensor:
    """Largest singular value ratio ``-log p_1``."""
    return 0.0 - torch.log(normalised_spectrum(sigma)[..., 0])  # +0.0 for rank one, not -0.0


def _inverse_row_norms(x: Tensor) -> Tensor:
    """``1 / ||row||`` as ``(..., M, 1)``; zero for all-zero rows."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    nonzero = norm > 0
    return torch.where(nonzero, 1.0 / torch.where(nonzero, norm, 1.0), 0.0)


class _NormalizeRows(torch.autograd.Function):
    """``x / ||x||`` per row with a fused backward ``r (g - y <y, g>)``.

    All-zero rows map to zero with zero gradient (``r = 0`` there).
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        r = _inverse_row_norms(x)
        return x * r, r

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        y, r = output
        ctx.save_for_backward(y, r)
        ctx.mark_non_differentiable(r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_r: Tensor):  # type: ignore[override]
        y, r = ctx.saved_tensors
        dot = (y * grad).sum(dim=-1, keepdim=True)
        return r * torch.addcmul(grad, y, dot, value=-1.0)


class _RowDistance(torch.autograd.Function):
    """Per-row ``|| z / ||z|| - f / ||f|| ||^2`` with a fused backward; ``f`` is a constant.

    Forward: two row norms, one ``(M, D)`` temporary (the difference of the
    normalised rows) and one row reduction. Backward, with ``d`` that
    difference and ``r = 1 / ||z||``:
    ``grad = 2 g r (d - (z r) <z r, d>)``, one row dot and two passes, where
    autograd would record about a dozen. All-zero rows of ``z`` get a zero
    gradient; all-zero rows of ``f`` normalise to zero.
    """

    @staticmethod
    def forward(ctx, z: Tensor, f: Tensor) -> Tensor:  # type: ignore[override]
        rz = _inverse_row_norms(z)
        diff = z * rz
        diff.addcmul_(f, _inverse_row_norms(f), value=-1.0)
        ctx.save_for_backward(z, rz, diff)
        return torch.linalg.vecdot(diff, diff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, rz, diff = ctx.saved_tensors
        alpha = (2 * grad).unsqueeze(-1) * rz  # (..., M, 1)
        cos = torch.linalg.vecdot(z, diff).unsqueeze(-1) * rz  # <z / ||z||, diff>
        out = diff * alpha
        return out.addcmul_(z, alpha * rz * cos, value=-1.0), None


def row_distance(z: Tensor, f: Tensor) -> Tensor:
    """``|| z/||z|| - f/||f|| ||^2`` per row, ``(..., M)``; ``f`` is treated as a constant."""
    return _RowDistance.apply(z, f.detach())


def consistency(z: Tensor, f: Tensor, mode: str, reduction: str = "mean") -> Tensor:
    """``L_MSE``: the row distance of :func:`row_distance`, over ``D`` too for ``mode="element"``, reduced
    (``"mean"``, ``"sum"`` or ``"none"``); in float32 or float64 with autocast off."""
    with autocast_off(z):
        zc = upcast(z, "float32")
        dist = row_distance(zc, upcast(f, "float32").to(zc.dtype))  # f detached there
        if mode == "element":
            dist = dist / z.shape[-1]
        if reduction == "mean":
            dist = dist.mean()
        elif reduction == "sum":
            dist = dist.sum()
    return dist


def _normalize_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero with zero gradient."""
    return _NormalizeRows.apply(x)[0]

