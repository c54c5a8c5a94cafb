"""NMTune's loss terms and spectral metrics as pure functions.

Every function takes features of shape ``(..., M, D)``: ``M`` samples (rows)
of ``D`` features, with any number of leading dimensions for a stack of
feature matrices (several layers, groups or heads) handled in one call.
Per-matrix results have the leading shape ``(...)``; a single matrix gives a
0-dim tensor. Results come back in float32 for float16/bfloat16 inputs (a
half-precision reduction overflows: PyTorch's losses do the same under
autocast) and in the input's dtype otherwise (float64 stays float64).

The terms follow Section 3.1 of the paper (Chen et al., ICLR 2024):

* :func:`consistency_loss` -- ``|| F/||F|| - Z/||Z|| ||^2`` per sample;
* :func:`covariance_loss` -- ``(1/D) sum_{i != j} C(Z)_ij^2``;
* :func:`singular_value_loss` -- ``-sigma_1 / sum_j sigma_j`` of ``Z``
  (``top_k > 1``: the mean of the top-``k`` normalised singular values, as in
  the authors' released code);

and the metrics of Section 2: singular value entropy (SVE), largest singular
value ratio (LSVR) and effective rank ``exp(SVE)``.

Validation happens here, once, at the public entry points; the
:mod:`nmtune._kernels` they call assume valid input.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from nmtune import _kernels
from nmtune._validation import check_choice, check_int, check_same_device, check_tensor

__all__ = [
    "consistency_loss",
    "covariance_loss",
    "singular_values",
    "singular_value_loss",
    "singular_value_entropy",
    "largest_singular_value_ratio",
    "effective_rank",
    "spectrum_metrics",
    "singular_value_loss_from_singular_values",
    "sve_from_singular_values",
    "lsvr_from_singular_values",
]

REDUCTIONS = ("mean", "sum", "none")
CONSISTENCY_MODES = ("sample", "element")


# ----------------------------------------------------------------------------
# validation


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def validate_features(z: object, name: str = "z", *, min_rows: int = 2) -> Tensor:
    """Validate a feature stack ``(..., M, D)``; returns it unchanged.

    Raises:
        TypeError: ``z`` is not a floating-point tensor.
        ValueError: fewer than two dimensions, fewer than ``min_rows`` rows,
            or no feature columns.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., M, D); got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64); got dtype {z.dtype}"
        )
    if z.dim() < 2:
        raise ValueError(f"{name} must have shape (..., M, D) with at least 2 dims; got shape {_shape(z)}")
    if z.shape[-2] < min_rows:
        raise ValueError(
            f"{name} has {z.shape[-2]} row(s); the batch statistics need at least {min_rows} "
            f"(got shape {_shape(z)})"
        )
    if z.shape[-1] < 1:
        raise ValueError(f"{name} has no feature columns (got shape {_shape(z)})")
    return z


def validate_finite(
    x: Tensor, name: str = "z", *, also: Tensor | None = None, also_name: str = "f",
    hint: str = "Pass check_finite=False to skip this check.",
) -> None:
    """Raise ``ValueError`` if ``x`` (or ``also``) holds NaN or Inf.

    This is the only value-dependent check in nmtune and costs one host
    synchronisation (one for both tensors); it is skipped while
    ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling() or x.is_meta or (also is not None and also.is_meta):
        return  # no values to check (meta tensors carry shapes only)
    ok = torch.isfinite(x).all()
    if also is not None:
        ok = ok & torch.isfinite(also).all()
    if bool(ok):
        return
    if also is not None and bool(torch.isfinite(x).all()):
        x, name = also, also_name
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{name} holds {n_nan} NaN and {n_inf} Inf value(s) (shape {_shape(x)}); expected finite "
            f"features. {hint}".rstrip()
        )


def validate_precision(precision: str) -> str:
    return check_choice("precision", precision, _kernels.PRECISIONS)  # type: ignore[return-value]


def validate_top_k(top_k: object, z_shape: tuple[int, ...] | torch.Size) -> int:
    top_k = check_int("top_k", top_k)
    bound = min(z_shape[-2], z_shape[-1])
    if top_k < 1 or top_k > bound:
        raise ValueError(
            f"top_k must be in [1, min(M, D)] = [1, {bound}] for features of shape {tuple(z_shape)}; "
            f"got {top_k}"
        )
    return top_k


# ----------------------------------------------------------------------------
# functions of the singular values


def _normalised_spectrum(sigma: Tensor) -> Tensor:
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


def validate_singular_values(sigma: object) -> Tensor:
    """``sigma`` as singular values ``(..., K)``: floating, ``K >= 1``, finite and non-negative.

    The value check costs one host synchronisation (skipped for meta tensors and while
    ``torch.compile`` traces); the loss path uses the unchecked ``_*_of`` functions.
    """
    sigma = check_tensor("sigma", sigma, min_dim=1, nonempty=True)
    if not (torch.compiler.is_compiling() or sigma.is_meta) and not bool(
        (torch.isfinite(sigma) & (sigma >= 0)).all()
    ):
        raise ValueError(f"sigma must hold finite, non-negative singular values; got {sigma.tolist()!r:.200}")
    return sigma


def _svd_loss_of(sigma: Tensor, top_k: int) -> Tensor:
    p = _normalised_spectrum(sigma)
    k = min(top_k, sigma.shape[-1])
    return -p[..., :k].sum(dim=-1) / k


def _sve_of(sigma: Tensor) -> Tensor:
    p = _normalised_spectrum(sigma)
    positive = p > 0
    # ``0.0 - x`` rather than ``-x``: a point mass gives +0.0, not -0.0.
    return 0.0 - torch.where(positive, p * torch.log(torch.where(positive, p, 1.0)), 0.0).sum(dim=-1)


def _lsvr_of(sigma: Tensor) -> Tensor:
    return 0.0 - torch.log(_normalised_spectrum(sigma)[..., 0])  # +0.0 for rank one, not -0.0


def _metrics_of(sigma: Tensor) -> dict[str, Tensor]:
    sve = _sve_of(sigma)
    return {"sve": sve, "lsvr": _lsvr_of(sigma), "effective_rank": sve.exp()}


def singular_value_loss_from_singular_values(sigma: Tensor, top_k: int = 1) -> Tensor:
    """``-(1/k) sum_{i<=k} sigma_i / sum_j sigma_j`` from descending ``sigma``.

    ``k = min(top_k, len(sigma))``: with fewer singular values than ``top_k``
    (allowed by ``clamp_top_k``) the mean runs over those that exist, as in the
    authors' ``torch.mean(s[:5])``.
    """
    return _svd_loss_of(validate_singular_values(sigma), check_int("top_k", top_k, minimum=1))


def sve_from_singular_values(sigma: Tensor) -> Tensor:
    """Singular value entropy ``-sum_i p_i log p_i`` (``0 log 0 = 0``)."""
    return _sve_of(validate_singular_values(sigma))


def lsvr_from_singular_values(sigma: Tensor) -> Tensor:
    """Largest singular value ratio ``-log(sigma_1 / sum_j sigma_j)``."""
    return _lsvr_of(validate_singular_values(sigma))


def spectrum_metrics(sigma: Tensor) -> dict[str, Tensor]:
    """SVE, LSVR and effective rank of precomputed singular values.

    Args:
        sigma: ``(..., K)`` singular values in descending order (finite, non-negative).

    Returns:
        ``{"sve": ..., "lsvr": ..., "effective_rank": ...}``, each ``(...)``.
    """
    return _metrics_of(validate_singular_values(sigma))


# ----------------------------------------------------------------------------
# public terms


def consistency_loss(
    z: Tensor,
    f: Tensor,
    *,
    mode: str = "sample",
    reduction: str = "mean",
    check_finite: bool = True,
) -> Tensor:
    """Consistency with the pre-trained features: ``|| F/||F|| - Z/||Z|| ||^2``.

    Each row of ``z`` and of ``f`` is L2-normalised; ``f`` is the frozen
    reference and is detached. All-zero rows normalise to zero (no
    ``1 / eps`` gradients).

    Args:
        z: Tuned features ``(..., M, D)``.
        f: Reference (pre-trained) features, same shape as ``z``.
        mode: ``"sample"`` (the paper: squared distance summed over ``D``)
            or ``"element"`` (the authors' code: averaged over ``D``, like
            ``nn.MSELoss`` on the normalised rows).
        reduction: ``"mean"`` over rows (and leading dims), ``"sum"``, or
            ``"none"`` for the per-row distances ``(..., M)``.
        check_finite: Raise on NaN/Inf inputs (one host sync).

    Returns:
        The loss in ``z``'s dtype (float32 for half-precision ``z``).

    Example:
        >>> f = torch.randn(32, 64)
        >>> round(float(consistency_loss(f * 3.0, f)), 6)  # scale invariant
        0.0
    """
    validate_features(z, "z", min_rows=1)
    validate_features(f, "f", min_rows=1)
    if z.shape != f.shape:
        raise ValueError(
            f"z and f must have the same shape (..., M, D); got z {_shape(z)} and f {_shape(f)}"
        )
    check_same_device(z=z, f=f)
    check_choice("mode", mode, CONSISTENCY_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    if check_finite:
        validate_finite(z, "z", also=f, also_name="f")
    return _consistency(z, f, mode, reduction).to(_kernels.result_dtype(z.dtype))


def _consistency(z: Tensor, f: Tensor, mode: str, reduction: str = "mean") -> Tensor:
    """The consistency formula (no validation), in float32 or float64 with autocast off."""
    with _kernels.autocast_off(z):
        zc = _kernels.upcast(z, "float32")
        dist = _kernels.row_distance(zc, _kernels.upcast(f, "float32").to(zc.dtype))  # f detached there
        if mode == "element":
            dist = dist / z.shape[-1]
        if reduction == "mean":
            dist = dist.mean()
        elif reduction == "sum":
            dist = dist.sum()
    return dist


def covariance_loss(z: Tensor, *, precision: str = "float32", check_finite: bool = True) -> Tensor:
    """Covariance decorrelation ``(1/D) sum_{i != j} C_ij^2``.

    ``C = (Z - mean)^T (Z - mean) / (M - 1)`` is the sample covariance of
    the batch actually passed (``M`` from the tensor's shape). Computed
    through the smaller of the ``M x M`` and ``D x D`` Gram matrices; no
    ``D x D`` mask or copy.

    Args:
        z: Features ``(..., M, D)`` with ``M >= 2``.
        precision: Dtype of the Gram product (``"float32"`` or ``"float64"``).
        check_finite: Raise on NaN/Inf inputs (one host sync).

    Returns:
        ``(...)`` tensor, in ``z``'s dtype (float32 for half-precision ``z``).

    Example:
        >>> z = torch.randn(128, 16)
        >>> covariance_loss(z).shape
        torch.Size([])
    """
    validate_features(z)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    cov = nmtune_terms(z, covariance=True, singular_value=False, precision=precision).covariance
    return cov.to(_kernels.result_dtype(z.dtype))  # type: ignore[union-attr]


def singular_values(
    z: Tensor,
    *,
    precision: str = "float64",
    normalize_rows: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """Singular values of ``z`` (uncentred), descending, differentiable.

    Computed as ``sqrt`` of the eigenvalues of the smaller Gram matrix,
    in float64 by default (a float32 Gram loses singular values below about
    ``3e-4 sigma_1``).

    Args:
        z: Features ``(..., M, D)`` with ``M >= 2``.
        precision: ``"float64"`` (default) or ``"float32"`` (faster).
        normalize_rows: L2-normalise rows first (the authors' analysis).
        check_finite: Raise on NaN/Inf inputs (one host sync).

    Returns:
        ``(..., min(M, D))`` in ``z``'s dtype (float32 for half-precision ``z``).

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0])))
        tensor([3., 1.])
    """
    validate_features(z)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    stats = _kernels.spectral_stats(
        z, precision=precision, covariance=False, normalize_rows=normalize_rows
    )
    return stats.singular_values.to(_kernels.result_dtype(z.dtype))  # type: ignore[union-attr]


def singular_value_loss(
    z: Tensor, top_k: int = 1, *, precision: str = "float64", check_finite: bool = True
) -> Tensor:
    """Dominant singular value term ``-(1/k) sum_{i<=k} sigma_i / sum_j sigma_j``.

    ``top_k=1`` is the paper's ``-sigma_1 / sum sigma``; ``top_k=5`` is what
    the authors' released code uses. Bounded in ``[-1/k, -1/min(M, D)]``.

    Args:
        z: Features ``(..., M, D)`` with ``M >= 2``.
        top_k: Number of leading singular values, ``1 <= k <= min(M, D)``.
        precision: Spectrum precision, ``"float64"`` or ``"float32"``.
        check_finite: Raise on NaN/Inf inputs (one host sync).

    Example:
        >>> float(singular_value_loss(torch.ones(4, 3)))  # rank one
        -1.0
    """
    validate_features(z)
    validate_top_k(top_k, z.shape)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    svd = nmtune_terms(z, covariance=False, singular_value=True, top_k=top_k, precision=precision).singular_value
    return svd.to(_kernels.result_dtype(z.dtype))  # type: ignore[union-attr]


def _of_spectrum(
    metric: Callable[[Tensor], Tensor], z: Tensor, precision: str, normalize_rows: bool, check_finite: bool
) -> Tensor:
    """``metric`` of the singular values of ``z`` (validated by :func:`singular_values`)."""
    return metric(singular_values(z, precision=precision, normalize_rows=normalize_rows, check_finite=check_finite))


def singular_value_entropy(
    z: Tensor, *, precision: str = "float64", normalize_rows: bool = False, check_finite: bool = True
) -> Tensor:
    """Singular value entropy (SVE) ``-sum_i p_i log p_i``, ``p = sigma / sum sigma``.

    Lies in ``[0, log min(M, D)]``; higher means the features span more
    directions (the paper's signature of pre-training noise). The keywords
    are :func:`singular_values`'.

    Example:
        >>> round(float(singular_value_entropy(torch.eye(4))), 4)  # log 4
        1.3863
    """
    return _of_spectrum(_sve_of, z, precision, normalize_rows, check_finite)


def largest_singular_value_ratio(
    z: Tensor, *, precision: str = "float64", normalize_rows: bool = False, check_finite: bool = True
) -> Tensor:
    """Largest singular value ratio (LSVR) ``-log(sigma_1 / sum_j sigma_j)``.

    Zero for a rank-one matrix, ``log min(M, D)`` for a flat spectrum: higher
    means a weaker dominant direction (the other signature of pre-training
    noise in the paper). The keywords are :func:`singular_values`'.

    Example:
        >>> float(largest_singular_value_ratio(torch.ones(4, 3)))
        0.0
    """
    return _of_spectrum(_lsvr_of, z, precision, normalize_rows, check_finite)


def effective_rank(
    z: Tensor, *, precision: str = "float64", normalize_rows: bool = False, check_finite: bool = True
) -> Tensor:
    """Effective rank ``exp(SVE)`` (Roy & Vetterli), in ``[1, min(M, D)]``.

    The keywords are :func:`singular_values`'.

    Example:
        >>> round(float(effective_rank(torch.eye(4))), 4)
        4.0
    """
    return _of_spectrum(_sve_of, z, precision, normalize_rows, check_finite).exp()


# ----------------------------------------------------------------------------
# the one entry point from statistics to terms


class Terms(NamedTuple):
    """NMTune's terms and spectral metrics from one set of statistics (``None``: not asked).

    ``consistency`` is a scalar (mean over rows); the others have the leading
    shape ``(...)`` of the features whose statistics they come from.
    """

    consistency: Tensor | None
    covariance: Tensor | None
    singular_value: Tensor | None
    sve: Tensor | None
    lsvr: Tensor | None


def nmtune_terms(
    z: Tensor,
    f: Tensor | None = None,
    *,
    covariance: bool = True,
    singular_value: bool = True,
    metrics: bool = False,
    top_k: int = 1,
    consistency_mode: str = "sample",
    precision: str = "float64",
    statistics_of: Tensor | _kernels.Moments | None = None,
) -> Terms:
    """Every NMTune term and metric from one Gram product and one eigendecomposition.

    The one place that turns statistics into terms: :func:`covariance_loss`,
    :func:`singular_value_loss`, :class:`~nmtune.NMTuneRegularizer` and
    :func:`~nmtune.evaluate` all come here. Inputs are not validated (the public
    entry points do that once); results are in the compute dtype.

    Args:
        z: Tuned features ``(..., M, D)``.
        f: Reference features paired row by row with ``z`` for the consistency
            term (``None``: no consistency term).
        covariance: Compute ``L_COV = (1/D) sum_{i != j} C_ij^2``.
        singular_value: Compute ``L_SVD`` (``top_k`` leading singular values).
        metrics: Also return SVE and LSVR (detached). Costs an eigendecomposition
            only when ``singular_value`` is off.
        top_k: Leading singular values in ``L_SVD`` (the mean runs over at most
            as many as exist).
        consistency_mode: Consistency reduction over features, ``"sample"`` or ``"element"``.
        precision: Spectrum/Gram precision.
        statistics_of: Rows whose covariance and spectrum are taken (the
            gathered global batch under DDP), or their all-reduced mean and
            scatter (:func:`nmtune.distributed.all_reduce_moments`); defaults to ``z``.

    Example:
        >>> t = nmtune_terms(torch.randn(16, 8), torch.randn(16, 8), metrics=True)
        >>> [name for name, v in t._asdict().items() if v is not None]
        ['consistency', 'covariance', 'singular_value', 'sve', 'lsvr']
    """
    zs = z if statistics_of is None else statistics_of
    mse = _consistency(z, f, consistency_mode) if f is not None else None
    cov = svd = sigma = None
    if covariance or singular_value:
        stats = _kernels.spectral_stats(zs, precision=precision, singular_values=singular_value, covariance=covariance)
        sigma = stats.singular_values
        if covariance:
            cov = stats.offdiag_energy / zs.shape[-1]  # type: ignore[operator]
        if singular_value:
            svd = _svd_loss_of(sigma, top_k)  # type: ignore[arg-type]
    sve = lsvr = None
    if metrics:
        with torch.no_grad():
            if sigma is None:
                sigma = _kernels.spectral_stats(zs.detach(), precision=precision, covariance=False).singular_values
            sve = _sve_of(sigma.detach())  # type: ignore[union-attr]
            lsvr = _lsvr_of(sigma.detach())  # type: ignore[union-attr]
    return Terms(mse, cov, svd, sve, lsvr)


# ----------------------------------------------------------------------------
# the 0.1 names (until 0.3)


def _renamed(new: Callable[..., Tensor], old: str) -> Callable[..., Tensor]:
    @functools.wraps(new)
    def alias(*args: Any, **kwargs: Any) -> Tensor:
        warnings.warn(f"nmtune.functional.{old} is renamed {new.__name__}; the old name works until nmtune 0.3",
                      DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    return alias


singular_value_ratio_loss = _renamed(singular_value_loss, "singular_value_ratio_loss")
ratio_from_singular_values = _renamed(singular_value_loss_from_singular_values, "ratio_from_singular_values")
entropy_from_singular_values = _renamed(sve_from_singular_values, "entropy_from_singular_values")
