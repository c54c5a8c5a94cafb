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
value ratio (LSVR) and effective rank ``exp(SVE)``. :func:`nmtune_regularizer` is the
whole regularizer of an :class:`~nmtune.NMTuneConfig`, the function behind
:class:`~nmtune.NMTuneRegularizer`.

Validation happens here, once, at the public entry points; the
:mod:`nmtune._kernels` they call assume valid input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from nmtune import _kernels
from nmtune._deprecation import module_getattr
from nmtune._validation import check_choice, check_features, check_int, check_tensor
from nmtune.config import CONSISTENCY_MODES, PRECISIONS, NMTuneConfig, resolve_config

__all__ = [
    "nmtune_regularizer",
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


# ----------------------------------------------------------------------------
# validation


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every term and metric is returned in: float32 for half inputs
    (as PyTorch's own losses under autocast), else the input's (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


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
    return check_choice("precision", precision, PRECISIONS)  # type: ignore[return-value]


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


def validate_singular_values(sigma: object) -> Tensor:
    """``sigma`` as singular values ``(..., K)``: floating, ``K >= 1``, finite and non-negative.

    The value check costs one host synchronisation (skipped for meta tensors and while
    ``torch.compile`` traces); the loss path uses the unchecked ``_kernels.*_of`` functions.
    """
    sigma = check_tensor("sigma", sigma, min_dim=1, nonempty=True)
    if not (torch.compiler.is_compiling() or sigma.is_meta) and not bool(
        (torch.isfinite(sigma) & (sigma >= 0)).all()
    ):
        raise ValueError(f"sigma must hold finite, non-negative singular values; got {sigma.tolist()!r:.200}")
    return sigma


def _metrics_of(sigma: Tensor) -> dict[str, Tensor]:
    sve = _kernels.sve_of(sigma)
    return {"sve": sve, "lsvr": _kernels.lsvr_of(sigma), "effective_rank": sve.exp()}


def singular_value_loss_from_singular_values(sigma: Tensor, top_k: int = 1) -> Tensor:
    """``-(1/k) sum_{i<=k} sigma_i / sum_j sigma_j`` from descending ``sigma``.

    ``k = min(top_k, len(sigma))``: with fewer singular values than ``top_k``
    (allowed by ``clamp_top_k``) the mean runs over those that exist, as in the
    authors' ``torch.mean(s[:5])``.
    """
    return _kernels.svd_loss_of(validate_singular_values(sigma), check_int("top_k", top_k, minimum=1))


def sve_from_singular_values(sigma: Tensor) -> Tensor:
    """Singular value entropy ``-sum_i p_i log p_i`` (``0 log 0 = 0``)."""
    return _kernels.sve_of(validate_singular_values(sigma))


def lsvr_from_singular_values(sigma: Tensor) -> Tensor:
    """Largest singular value ratio ``-log(sigma_1 / sum_j sigma_j)``."""
    return _kernels.lsvr_of(validate_singular_values(sigma))


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
    check_features("z", z)
    check_features("f", f, like=("z", z))
    check_choice("mode", mode, CONSISTENCY_MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    if check_finite:
        validate_finite(z, "z", also=f, also_name="f")
    return _kernels.consistency(z, f, mode, reduction).to(result_dtype(z.dtype))


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
    check_features("z", z, min_rows=2)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    cov = nmtune_terms(z, covariance=True, singular_value=False, precision=precision).covariance
    return cov.to(result_dtype(z.dtype))  # type: ignore[union-attr]


def singular_values(
    z: Tensor,
    *,
    precision: str = "float64",
    normalize_rows: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """Singular values of ``z`` (uncentred), descending, differentiable.

    Computed as ``sqrt`` of the eigenvalues of the smaller Gram matrix, in
    float64 by default. Singular values below ``sqrt(n * eps) * sigma_1``
    (``n = min(M, D)``, ``eps`` that of the precision) count as zero: about
    ``8e-8 sigma_1`` in float64 and ``2e-3 sigma_1`` in float32 for a
    ``32 x 48`` batch.

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
    check_features("z", z, min_rows=2)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    stats = _kernels.spectral_stats(z, precision=precision, covariance=False, normalize_rows=normalize_rows)
    return stats.singular_values.to(result_dtype(z.dtype))  # type: ignore[union-attr]


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
    check_features("z", z, min_rows=2)
    validate_top_k(top_k, z.shape)
    validate_precision(precision)
    if check_finite:
        validate_finite(z)
    svd = nmtune_terms(z, covariance=False, singular_value=True, top_k=top_k, precision=precision).singular_value
    return svd.to(result_dtype(z.dtype))  # type: ignore[union-attr]


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
    return _of_spectrum(_kernels.sve_of, z, precision, normalize_rows, check_finite)


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
    return _of_spectrum(_kernels.lsvr_of, z, precision, normalize_rows, check_finite)


def effective_rank(
    z: Tensor, *, precision: str = "float64", normalize_rows: bool = False, check_finite: bool = True
) -> Tensor:
    """Effective rank ``exp(SVE)`` (Roy & Vetterli), in ``[1, min(M, D)]``.

    The keywords are :func:`singular_values`'.

    Example:
        >>> round(float(effective_rank(torch.eye(4))), 4)
        4.0
    """
    return _of_spectrum(_kernels.sve_of, z, precision, normalize_rows, check_finite).exp()


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
    :func:`singular_value_loss` and :func:`nmtune_regularizer` come here. Inputs are
    not validated (the public entry points do that once); results are in the compute dtype.

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
    mse = _kernels.consistency(z, f, consistency_mode) if f is not None else None
    cov = svd = sigma = None
    if covariance or singular_value:
        stats = _kernels.spectral_stats(zs, precision=precision, singular_values=singular_value, covariance=covariance)
        sigma = stats.singular_values
        if covariance:
            cov = stats.offdiag_energy / zs.shape[-1]  # type: ignore[operator]
        if singular_value:
            svd = _kernels.svd_loss_of(sigma, top_k)  # type: ignore[arg-type]
    sve = lsvr = None
    if metrics:
        with torch.no_grad():
            if sigma is None:
                sigma = _kernels.spectral_stats(zs.detach(), precision=precision, covariance=False).singular_values
            sve = _kernels.sve_of(sigma.detach())  # type: ignore[union-attr]
            lsvr = _kernels.lsvr_of(sigma.detach())  # type: ignore[union-attr]
    return Terms(mse, cov, svd, sve, lsvr)


# ----------------------------------------------------------------------------
# the whole regularizer


@dataclass(frozen=True)
class LossComponents:
    """One step's loss terms, for logging.

    ``loss`` is the differentiable total; every other field is a detached
    0-dim tensor (no host sync: call ``.item()`` only when you log).
    Unweighted terms are reported (``consistency`` is ``L_MSE`` before
    ``lambda_ * consistency_weight``); disabled terms are zero. ``skipped`` is 1 when
    the batch was too small for the regularizers and ``small_batch="skip"``
    skipped them (every term, SVE and LSVR are then 0), else 0: summing it
    over steps counts the skipped batches without a host sync.
    """

    loss: Tensor
    task: Tensor
    regularizer: Tensor
    consistency: Tensor
    covariance: Tensor
    singular_value: Tensor
    sve: Tensor
    lsvr: Tensor
    skipped: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The detached fields by name (``loss`` detached too)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["loss"] = out["loss"].detach()
        return out


def nmtune_regularizer(
    z: Tensor,
    f: Tensor | None = None,
    config: NMTuneConfig | str | None = None,
    *,
    views: int = 1,
    return_components: bool = False,
) -> Tensor | LossComponents:
    """The NMTune regularizers of ``config``: ``lambda_ * (w_c L_MSE + w_v L_COV + w_s L_SVD)``.

    The function behind :class:`~nmtune.NMTuneRegularizer`: the same checks, statistics and
    result for the rows it is given (the module also gathers the global batch under
    ``gather_distributed``; this function reads no process group).

    Args:
        z: Tuned features ``(..., M, D)``.
        f: Frozen reference features of the same shape; required when the
            consistency term is enabled.
        config: An :class:`~nmtune.NMTuneConfig` or a preset name (default ``"paper"``).
        views: ``1`` or ``2`` (``z`` and ``f`` are ``cat([weak, strong])``; ``L_MSE``
            pairs the strong view's ``Z`` with the weak view's ``F``), as for
            :meth:`NMTuneRegularizer.forward <nmtune.NMTuneRegularizer.forward>`.
        return_components: Return a :class:`LossComponents` (``task`` zero) instead of the scalar.

    Returns:
        The regularizer, a scalar in ``z``'s dtype (float32 for half-precision ``z``), or
        its :class:`LossComponents`.

    Example:
        >>> from nmtune import NMTuneRegularizer
        >>> f = torch.randn(64, 32)
        >>> z = (f + 0.1 * torch.randn(64, 32)).requires_grad_()
        >>> torch.equal(nmtune_regularizer(z, f), NMTuneRegularizer()(z, f))  # the "paper" preset
        True
        >>> parts = nmtune_regularizer(z, f, "official", views=2, return_components=True)
        >>> parts.loss.backward()
        >>> float(parts.skipped), parts.sve > 0
        (0.0, tensor(True))
    """
    cfg = resolve_config(config, {})
    check_regularizer_inputs(z, f, cfg, views=views)
    return weighted_regularizer(z, f, cfg, views=views, return_components=return_components)


def check_regularizer_inputs(z: object, f: object, config: NMTuneConfig, *, views: int = 1) -> None:
    """What :func:`nmtune_regularizer` checks before any statistic: ``views``, and ``z`` (with ``f``
    when ``config`` has a consistency term) as feature batches of one shape on one device.

    :class:`~nmtune.NMTuneRegularizer` calls it before gathering the global batch, whose rows
    :func:`weighted_regularizer` then counts.
    """
    check_choice("views", views, (1, 2))
    check_features("z", z)
    if not config.uses_consistency:
        return
    if f is None:
        raise ValueError(
            "the consistency term needs the reference features f (got None); pass f or set consistency_weight=0"
        )
    check_features("f", f, like=("z", z))  # type: ignore[arg-type]


def weighted_regularizer(
    z: Tensor,
    f: Tensor | None,
    config: NMTuneConfig,
    *,
    views: int = 1,
    statistics_of: Tensor | _kernels.Moments | None = None,
    return_components: bool = False,
) -> Tensor | LossComponents:
    """:func:`nmtune_regularizer` after :func:`check_regularizer_inputs`: the checks that need the
    statistics' rows (enough of them, ``top_k``, finite values), the terms, their weighted sum."""
    zs = z if statistics_of is None else statistics_of
    out_dtype = result_dtype(z.dtype)
    if zs.shape[-2] < 2:
        if config.small_batch == "skip":
            return _skipped(z, out_dtype, return_components)
        raise _too_few_rows(zs, z)
    if config.uses_singular_value and not config.clamp_top_k:
        validate_top_k(config.top_k, zs.shape)
    if config.check_finite:  # one host sync for both tensors
        validate_finite(z, "z", also=f if config.uses_consistency else None, also_name="f")
    zc, fc = _paired_views(z, f, views) if config.uses_consistency else (z, None)
    terms = nmtune_terms(
        zc, fc, covariance=config.uses_covariance, singular_value=config.uses_singular_value, metrics=return_components,
        top_k=config.top_k, consistency_mode=config.consistency_mode, precision=config.precision, statistics_of=zs,
    )
    weights = (config.consistency_weight, config.covariance_weight, config.singular_value_weight)
    weighted = [w * t.mean() for w, t in zip(weights, terms[:3]) if t is not None]
    # With every term off, a zero that keeps each parameter behind z in the graph (DDP).
    reg = (config.lambda_ * sum(weighted[1:], weighted[0]) if weighted else z.sum() * 0).to(out_dtype)
    if not return_components:
        return reg
    zero = z.new_zeros((), dtype=out_dtype)
    mse, cov, svd, sve, lsvr = (zero if t is None else t.detach().mean().to(out_dtype) for t in terms)
    return LossComponents(loss=reg, task=zero, regularizer=reg.detach(), consistency=mse, covariance=cov,
                          singular_value=svd, sve=sve, lsvr=lsvr, skipped=zero)


def _skipped(z: Tensor, out_dtype: torch.dtype, return_components: bool) -> Tensor | LossComponents:
    """A batch too small for the statistics under ``small_batch="skip"``."""
    reg = (z.sum() * 0).to(out_dtype)  # keeps z's parameters in the graph (DDP)
    if not return_components:
        return reg
    zero = z.new_zeros((), dtype=out_dtype)
    return LossComponents(loss=reg, task=zero, regularizer=zero, consistency=zero, covariance=zero,
                          singular_value=zero, sve=zero, lsvr=zero, skipped=torch.ones_like(zero))


def _too_few_rows(zs: Tensor | _kernels.Moments, z: Tensor) -> ValueError:
    """The error for fewer than 2 rows: of ``z``, or of the global batch its statistics come from."""
    where = "z" if zs is z else "the global batch of z"
    return ValueError(f"{where} has {zs.shape[-2]} row(s); the batch statistics need at least 2 "
                      f"(got shape {_shape(z)}{'' if zs is z else f', global shape {tuple(zs.shape)}'})")


def _paired_views(z: Tensor, f: Tensor | None, views: int) -> tuple[Tensor, Tensor | None]:
    """The rows the consistency term compares: all of them, or (two views) strong ``Z`` with weak ``F``."""
    if views == 1:
        return z, f
    m = z.shape[-2]
    if m % 2:
        raise ValueError(f"views=2 needs cat([weak, strong]) with an even number of rows; got z {_shape(z)}")
    return z[..., m // 2 :, :], f[..., : m // 2, :]  # type: ignore[index]


# ----------------------------------------------------------------------------
# the 0.1 names (until 0.3)

__getattr__ = module_getattr(__name__, globals(), {
    "singular_value_ratio_loss": "singular_value_loss",
    "ratio_from_singular_values": "singular_value_loss_from_singular_values",
    "entropy_from_singular_values": "sve_from_singular_values",
})
