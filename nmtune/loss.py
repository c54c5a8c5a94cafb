"""``NMTuneLoss`` and ``NMTuneRegularizer``: thin modules over :func:`nmtune.functional.nmtune_regularizer`.

``L = task_loss(logits, y) + lambda_ * (w_consistency L_MSE + w_covariance L_COV + w_singular_value L_SVD)``

The regularizer's forward checks its inputs, takes the rows for the batch statistics
(the global batch under ``gather_distributed``) and makes one functional call, which
asks :mod:`nmtune._kernels` for one spectrum and one covariance statistic per step
(shared by ``L_SVD``, ``L_COV``, SVE and LSVR) and never synchronises with the host on
the training path (the optional NaN/Inf check aside).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from nmtune import functional as NF
from nmtune._validation import check_same_device
from nmtune.config import PRESETS, NMTuneConfig, resolve_config
from nmtune.distributed import global_statistics
from nmtune.functional import LossComponents

__all__ = ["NMTuneConfig", "NMTuneRegularizer", "NMTuneLoss", "LossComponents", "PRESETS"]  # config re-exported


class NMTuneRegularizer(nn.Module):
    """The NMTune regularizers alone, for a loop with its own task loss.

    ``lambda_ * (consistency_weight L_MSE + covariance_weight L_COV + singular_value_weight L_SVD)``,
    the module form of :func:`nmtune.functional.nmtune_regularizer` that also gathers the global
    batch under ``gather_distributed``.

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
        NF.check_regularizer_inputs(z, f, cfg, views=views)
        rows = global_statistics(z, statistics=cfg.distributed_statistics, precision=cfg.precision,
                                 equal_local_batches=cfg.equal_local_batches) if _gathers(cfg) else z
        return NF.weighted_regularizer(z, f, cfg, views=views, statistics_of=rows, return_components=return_components)


def _gathers(cfg: NMTuneConfig) -> bool:
    """Whether the covariance and spectrum come from the global batch (``gather_distributed``, a term that needs it)."""
    return cfg.gather_distributed and (cfg.uses_covariance or cfg.uses_singular_value)


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
    check_same_device(logits=logits, target=target, z=z)
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
            check_same_device(logits=logits, z=z, f=f)
        task = self.task_loss(logits, target)
        if not isinstance(task, Tensor) or task.dim() != 0:
            shape = tuple(task.shape) if isinstance(task, Tensor) else type(task).__name__
            raise ValueError(f"task_loss must return a scalar tensor; got {shape}")
        if not return_components:
            return task + self.regularizer(z, f, views=views)
        parts = self.regularizer(z, f, views=views, return_components=True)
        total = task + parts.loss
        return dataclasses.replace(parts, loss=total, task=task.detach().to(parts.regularizer.dtype))
