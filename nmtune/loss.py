"""``NMTuneLoss`` and ``NMTuneRegularizer``: thin modules over :mod:`nmtune.functional`.

``L = task_loss(logits, y) + lambda_ * (w_consistency L_MSE + w_covariance L_COV + w_singular_value L_SVD)``

The modules validate once, ask :mod:`nmtune._kernels` for one spectrum and
one covariance statistic per step (shared by ``L_SVD``, ``L_COV``, SVE and
LSVR) and never synchronise with the host on the training path (the optional
NaN/Inf check aside).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from nmtune import _kernels
from nmtune import functional as NF
from nmtune._validation import check_choice
from nmtune.config import PRESETS, NMTuneConfig, resolve_config

__all__ = ["NMTuneConfig", "NMTuneRegularizer", "NMTuneLoss", "LossComponents", "PRESETS"]  # config re-exported

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


class NMTuneRegularizer(nn.Module):
    """The NMTune regularizers alone, for a loop with its own task loss.

    ``lambda_ * (consistency_weight L_MSE + covariance_weight L_COV + singular_value_weight L_SVD)``

    Args:
        config: An :class:`NMTuneConfig` or a preset name (default ``"paper"``).
        **overrides: Fields of :class:`NMTuneConfig` to change.

    Example:
        >>> reg = NMTuneRegularizer()
        >>> f = torch.randn(64, 32)
        >>> z = f + 0.1 * torch.randn(64, 32, requires_grad=True)
        >>> reg(z, f).backward()
    """

    def __init__(self, config: NMTuneConfig | str | None = None, **overrides: Any) -> None:
        super().__init__()
        self.config = resolve_config(config, overrides)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())

    def forward(
        self, z: Tensor, f: Tensor | None = None, *, views: int = 1, return_components: bool = False
    ) -> Tensor | LossComponents:
        """Regularizer value (scalar) or, with ``return_components``, a :class:`LossComponents`.

        Args:
            z: Tuned features ``(..., M, D)``.
            f: Frozen reference features of the same shape; required when the
                consistency term is enabled.
            views: ``1`` (default) or ``2``: ``z`` and ``f`` stack two augmented
                views of the same ``B`` inputs as ``cat([weak, strong])``
                (``2B`` rows), as in the authors' training step. ``L_COV`` and
                ``L_SVD`` then use all ``2B`` rows of ``z``, and ``L_MSE`` pairs
                the strong view's ``Z`` with the weak view's ``F`` (``B`` rows).
            return_components: Return a :class:`LossComponents` (with
                ``task`` zero) instead of the scalar.
        """
        cfg = self.config
        check_choice("views", views, (1, 2))
        _check_features(cfg, z, f)
        zs = _statistics_rows(cfg, z)
        if zs.shape[-2] < 2:
            if cfg.small_batch == "skip":
                return _skipped(z, return_components)
            _raise_too_few_rows(zs, z)
        if cfg.uses_singular_value and not cfg.clamp_top_k:
            NF.validate_top_k(cfg.top_k, zs.shape)
        if cfg.check_finite:  # one host sync for both tensors
            NF.validate_finite(z, "z", also=f if cfg.uses_consistency else None, also_name="f")
        terms = NF.nmtune_terms(
            *_paired_views(z, f, views) if cfg.uses_consistency else (z, None),  # type: ignore[arg-type]
            covariance=cfg.uses_covariance, singular_value=cfg.uses_singular_value, metrics=return_components,
            top_k=cfg.top_k, consistency_mode=cfg.consistency_mode, precision=cfg.precision, statistics_of=zs,
        )
        return _weighted(cfg, z, terms, return_components)


def _gathers(cfg: NMTuneConfig) -> bool:
    return cfg.gather_distributed and (cfg.uses_covariance or cfg.uses_singular_value)


def _check_features(cfg: NMTuneConfig, z: object, f: object) -> None:
    """``z`` (and ``f`` when the consistency term is on) are valid, paired feature batches."""
    # Under "skip" (or a gather, where the global batch decides) one local row is not an error here.
    NF.validate_features(z, "z", min_rows=1 if cfg.small_batch == "skip" or _gathers(cfg) else 2)
    if not cfg.uses_consistency:
        return
    if f is None:
        raise ValueError(
            "the consistency term needs the reference features f (got None); pass f or set consistency_weight=0"
        )
    NF.validate_features(f, "f", min_rows=1)
    z, f = cast(Tensor, z), cast(Tensor, f)
    if f.shape != z.shape:
        raise ValueError(f"z and f must have the same shape; got z {tuple(z.shape)} and f {tuple(f.shape)}")
    _same_device(z=z, f=f)


def _statistics_rows(cfg: NMTuneConfig, z: Tensor) -> Tensor | _kernels.Moments:
    """What the covariance and spectrum are taken from: ``z``, or under ``gather_distributed`` the
    global batch's rows (gathered) or its mean and ``D x D`` scatter (all-reduced), per
    ``cfg.distributed_statistics``."""
    if not _gathers(cfg):
        return z
    from nmtune.distributed import global_statistics, is_distributed

    if not is_distributed():
        raise ValueError(
            "gather_distributed=True needs an initialised torch.distributed process group "
            "(torchrun + dist.init_process_group, or Accelerate); none is initialised"
        )
    return global_statistics(z, statistics=cfg.distributed_statistics, precision=cfg.precision,
                             equal_local_batches=cfg.equal_local_batches)


def _raise_too_few_rows(zs: Tensor | _kernels.Moments, z: Tensor) -> None:
    """Raise the ``ValueError`` for fewer than 2 rows (local, or global under ``gather_distributed``)."""
    if isinstance(zs, Tensor):
        NF.validate_features(zs, "z" if zs is z else "the gathered global batch of z")
    raise ValueError(
        f"the global batch of z has {zs.shape[-2]} row(s) across ranks; the batch statistics need at least 2 "
        f"(global shape {tuple(zs.shape)})"
    )


def _weighted(cfg: NMTuneConfig, z: Tensor, terms: NF.Terms, return_components: bool) -> Tensor | LossComponents:
    """``lambda_ * sum_t w_t mean(L_t)``, or the :class:`LossComponents` around it."""
    mse, cov, svd = terms.consistency, terms.covariance, terms.singular_value
    pairs = ((cfg.consistency_weight, mse), (cfg.covariance_weight, cov), (cfg.singular_value_weight, svd))
    weighted = [w * t.mean() for w, t in pairs if t is not None]
    out_dtype = _kernels.result_dtype(z.dtype)  # float32 for half inputs: a half sum overflows
    # With every term off, a zero that keeps each parameter behind z in the graph (DDP).
    reg = (cfg.lambda_ * sum(weighted[1:], weighted[0])) if weighted else z.sum() * 0
    reg = reg.to(out_dtype)
    if not return_components:
        return reg
    zero = z.new_zeros((), dtype=out_dtype)

    def detached(t: Tensor | None) -> Tensor:
        return zero if t is None else t.detach().mean().to(out_dtype)

    return LossComponents(
        loss=reg, task=zero, regularizer=reg.detach(), consistency=detached(mse), covariance=detached(cov),
        singular_value=detached(svd), sve=detached(terms.sve), lsvr=detached(terms.lsvr), skipped=zero,
    )


def _skipped(z: Tensor, return_components: bool) -> Tensor | LossComponents:
    """A batch too small for the statistics under ``small_batch="skip"``."""
    reg = (z.sum() * 0).to(_kernels.result_dtype(z.dtype))  # keeps z's parameters in the graph (DDP)
    if not return_components:
        return reg
    zero = z.new_zeros((), dtype=reg.dtype)
    return LossComponents(
        loss=reg, task=zero, regularizer=zero, consistency=zero, covariance=zero,
        singular_value=zero, sve=zero, lsvr=zero, skipped=torch.ones_like(zero),
    )


def _paired_views(z: Tensor, f: Tensor, views: int) -> tuple[Tensor, Tensor]:
    """The rows the consistency term compares: all of them, or (two views) strong ``Z`` with weak ``F``."""
    if views == 1:
        return z, f
    m = z.shape[-2]
    if m % 2:
        raise ValueError(f"views=2 needs cat([weak, strong]) with an even number of rows; got z {tuple(z.shape)}")
    return z[..., m // 2 :, :], f[..., : m // 2, :]


def _same_device(**tensors: Tensor) -> None:
    """One device for every tensor, or a ``ValueError`` naming where each one is."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"every tensor must be on one device; got {where}")


def _check_task_inputs(logits: object, target: object, z: Tensor, *, uses_default_loss: bool) -> None:
    """Rows of logits, target and z must agree: one logit row and one target per row of ``z``.

    The rows are compared along the first dimension for 2-D ``z`` (the usual
    ``(M, D)`` batch). With a custom ``task_loss`` only ``logits`` vs ``z`` is
    checked, and only when both are batches of rows, since such a loss may take
    targets of any shape.
    """
    for name, t in (("logits", logits), ("target", target), ("z", z)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    logits, target = cast(Tensor, logits), cast(Tensor, target)
    _same_device(logits=logits, target=target, z=z)
    if z.dim() == 2 and logits.dim() >= 1 and logits.shape[0] != z.shape[0]:
        raise ValueError(
            f"logits has {logits.shape[0]} row(s) but z has {z.shape[0]}; expected one row of logits per row of z "
            f"(got logits {tuple(logits.shape)}, z {tuple(z.shape)})"
        )
    if uses_default_loss:
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"logits must be floating (N, C) scores for cross-entropy; got {logits.dtype} "
                             f"{tuple(logits.shape)}")
        if target.dim() < 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target has shape {tuple(target.shape)} but logits has {logits.shape[0]} row(s); "
                             "expected class indices (N,) or class probabilities (N, C)")
        _check_ce_target(target, logits)


def _check_ce_target(target: Tensor, logits: Tensor) -> None:
    """Cross-entropy's target: int64 (or uint8) class indices ``(N,)`` or probabilities shaped like ``logits``."""
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"target of class probabilities must have logits' shape {tuple(logits.shape)}; got "
                             f"{target.dtype} {tuple(target.shape)} (class indices must be int64)")
    elif target.dtype not in (torch.int64, torch.uint8) or target.dim() != 1:
        raise TypeError(f"target must be int64 class indices (N,) or float probabilities (N, C); got {target.dtype} "
                        f"{tuple(target.shape)}")


class NMTuneLoss(nn.Module):
    """Task loss plus the NMTune regularizers.

    Args:
        config: An :class:`NMTuneConfig` or a preset name: ``"paper"``
            (default; lambda 0.01, weights 1/1/1, top_k 1, per-sample
            consistency), ``"official"`` (the authors' code: 1.0/0.04/0.001,
            no lambda, element-mean MSE, top_k 5) or ``"none"`` (task loss only).
        task_loss: Any ``callable(logits, target) -> scalar``; defaults to
            ``nn.CrossEntropyLoss()``.
        **overrides: Fields of :class:`NMTuneConfig` to change.

    Example:
        >>> from nmtune import NMTuneHead
        >>> head, criterion = NMTuneHead(32, 5), NMTuneLoss()
        >>> feats, labels = torch.randn(16, 32), torch.randint(0, 5, (16,))
        >>> out = head(feats)
        >>> criterion(out.logits, labels, out.features, feats).backward()
    """

    def __init__(
        self,
        config: NMTuneConfig | str | None = None,
        *,
        task_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be callable(logits, target) -> Tensor; got {type(task_loss).__name__}")
        self.regularizer = NMTuneRegularizer(config, **overrides)
        self._default_task_loss = task_loss is None
        self.task_loss = task_loss if task_loss is not None else nn.CrossEntropyLoss()

    @property
    def config(self) -> NMTuneConfig:
        return self.regularizer.config

    def forward(
        self,
        logits: Tensor,
        target: Tensor,
        z: Tensor,
        f: Tensor | None = None,
        *,
        views: int = 1,
        return_components: bool = False,
    ) -> Tensor | LossComponents:
        """Total loss, or a :class:`LossComponents` with ``return_components=True``.

        Args:
            logits: Classifier output for the task loss.
            target: Targets for the task loss.
            z: Tuned features ``(..., M, D)``.
            f: Frozen reference features (same shape as ``z``).
            views: ``2`` for the authors' two-view step (``logits``,
                ``target``, ``z`` and ``f`` are ``cat([weak, strong])``, the
                labels repeated); see :meth:`NMTuneRegularizer.forward`.

        Example (the authors' step, ``"official"`` preset):
            >>> from nmtune import NMTuneHead
            >>> head, crit = NMTuneHead.from_preset("official", 16, 3), NMTuneLoss("official")
            >>> f_weak, f_strong, y = torch.randn(8, 16), torch.randn(8, 16), torch.randint(0, 3, (8,))
            >>> f = torch.cat([f_weak, f_strong]); out = head(f)
            >>> crit(out.logits, torch.cat([y, y]), out.features, f, views=2).backward()
        """
        _check_task_inputs(logits, target, z, uses_default_loss=self._default_task_loss)
        if f is not None:
            _same_device(logits=logits, z=z, f=f)
        task = self.task_loss(logits, target)
        if not isinstance(task, Tensor) or task.dim() != 0:
            shape = tuple(task.shape) if isinstance(task, Tensor) else type(task).__name__
            raise ValueError(f"task_loss must return a scalar tensor; got {shape}")
        if not return_components:
            return task + self.regularizer(z, f, views=views)
        parts = self.regularizer(z, f, views=views, return_components=True)
        total = task + parts.loss
        return dataclasses.replace(parts, loss=total, task=task.detach().to(parts.regularizer.dtype))
