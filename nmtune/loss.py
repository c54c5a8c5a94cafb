"""``NMTuneLoss`` and ``NMTuneRegularizer``: thin modules over :mod:`nmtune.functional`.

``L = task_loss(logits, y) + lambda_ * (w_mse L_MSE + w_cov L_COV + w_svd L_SVD)``

The modules validate once, ask :mod:`nmtune._kernels` for one spectrum and
one covariance statistic per step (shared by ``L_SVD``, ``L_COV``, SVE and
LSVR) and never synchronise with the host on the training path (the optional
NaN/Inf check aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from nmtune import _kernels
from nmtune._validation import check_bool, check_choice, check_int, check_real
from nmtune import functional as NF

__all__ = ["NMTuneConfig", "NMTuneRegularizer", "NMTuneLoss", "LossComponents", "PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # Section 3.1 of the paper: L = L_CE + 0.01 (L_MSE + L_COV + L_SVD).
    "paper": dict(lambda_=0.01, mse_weight=1.0, cov_weight=1.0, svd_weight=1.0, top_k=1, consistency="sample"),
    # The authors' released training script: 1.0 MSE + 0.04 COV + 0.001 SVD, no lambda,
    # element-mean MSE of normalised rows, mean of the top-5 normalised singular values.
    # With fewer than 5 singular values (batches of <= 4 rows) the mean runs over those that exist.
    "official": dict(
        lambda_=1.0, mse_weight=1.0, cov_weight=0.04, svd_weight=0.001, top_k=5, consistency="element",
        clamp_top_k=True,
    ),
    # No regularization: the plain task loss (linear probing and MLP tuning baselines).
    "none": dict(lambda_=0.0, mse_weight=0.0, cov_weight=0.0, svd_weight=0.0, top_k=1, consistency="sample"),
}


SMALL_BATCH_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class NMTuneConfig:
    """Validated configuration of the NMTune regularizers.

    Attributes:
        lambda_: Overall weight of the regularizers (``0.01`` in the paper).
        mse_weight: Weight of the consistency term ``L_MSE``.
        cov_weight: Weight of the covariance term ``L_COV``.
        svd_weight: Weight of the dominant singular value term ``L_SVD``.
        top_k: Leading singular values in ``L_SVD`` (1 in the paper, 5 in the
            authors' code).
        consistency: ``"sample"`` (per-sample squared distance, the paper) or
            ``"element"`` (element mean, the authors' code).
        precision: Spectrum/Gram precision, ``"float64"`` (accurate, default)
            or ``"float32"`` (fast).
        check_finite: Raise ``ValueError`` on NaN/Inf features. Costs one
            host sync per call; set ``False`` for maximum speed.
        gather_distributed: Compute ``L_COV`` and ``L_SVD`` on the global
            batch gathered from every rank (autograd-aware); the consistency
            term stays local.
        equal_local_batches: With ``gather_distributed``, promise that every
            rank's batch has the same number of rows (``DistributedSampler``
            with ``drop_last=True`` on the loader). The gather then skips the
            per-step shape exchange and its host sync. A broken promise is an
            error inside the collective (gloo) or a hang (NCCL), so leave it
            ``False`` when the last batch can be short.
        small_batch: What a batch with fewer than 2 rows (the batch
            statistics need 2; under ``gather_distributed`` the global batch
            counts) gets: ``"error"`` (default: a ``ValueError``) or
            ``"skip"`` (every regularizer term is skipped for that batch, the
            value is a zero that keeps ``z`` in the graph, and
            ``LossComponents.skipped`` is 1). The decision is made from shapes
            only, so it costs no host sync. ``fit``, ``NMTuneTrainer`` and
            ``wrap_lora`` models use ``"skip"`` so that a ragged last batch of
            one row trains on its task loss instead of crashing.
        clamp_top_k: With fewer than ``top_k`` singular values (``min(M, D)
            < top_k``), average the ones that exist instead of raising. On in
            the ``"official"`` preset (the authors' ``torch.mean(s[:5])`` does
            this); off in ``"paper"``, where ``top_k`` is 1 and a larger value
            is a deliberate choice worth an error when the batch cannot honour it.

    Example:
        >>> cfg = NMTuneConfig.from_preset("official", top_k=3)
        >>> NMTuneConfig.from_json(cfg.to_json()) == cfg
        True
    """

    lambda_: float = 0.01
    mse_weight: float = 1.0
    cov_weight: float = 1.0
    svd_weight: float = 1.0
    top_k: int = 1
    consistency: str = "sample"
    precision: str = "float64"
    check_finite: bool = True
    gather_distributed: bool = False
    equal_local_batches: bool = False
    small_batch: str = "error"
    clamp_top_k: bool = False

    def __post_init__(self) -> None:
        for name in ("lambda_", "mse_weight", "cov_weight", "svd_weight"):
            object.__setattr__(self, name, check_real(name, getattr(self, name), minimum=0.0))
        check_int("top_k", self.top_k, minimum=1)
        check_choice("consistency", self.consistency, NF.CONSISTENCY_MODES)
        NF.validate_precision(self.precision)
        check_choice("small_batch", self.small_batch, SMALL_BATCH_POLICIES)
        for name in ("check_finite", "gather_distributed", "equal_local_batches", "clamp_top_k"):
            check_bool(name, getattr(self, name))

    # -- presets and serialisation ------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> NMTuneConfig:
        """A named preset (``"paper"``, ``"official"``, ``"none"``) with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> NMTuneConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NMTuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NMTuneConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> NMTuneConfig:
        return cls.from_dict(json.loads(text))

    # -- derived ------------------------------------------------------------------
    @property
    def uses_consistency(self) -> bool:
        return self.lambda_ > 0 and self.mse_weight > 0

    @property
    def uses_covariance(self) -> bool:
        return self.lambda_ > 0 and self.cov_weight > 0

    @property
    def uses_spectrum(self) -> bool:
        return self.lambda_ > 0 and self.svd_weight > 0


def _resolve_config(config: NMTuneConfig | str | None, overrides: dict[str, Any]) -> NMTuneConfig:
    if config is None:
        config = "paper"
    if isinstance(config, str):
        return NMTuneConfig.from_preset(config, **overrides)
    if isinstance(config, NMTuneConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(f"config must be an NMTuneConfig or a preset name; got {type(config).__name__}")


@dataclass(frozen=True)
class LossComponents:
    """One step's loss terms, for logging.

    ``loss`` is the differentiable total; every other field is a detached
    0-dim tensor (no host sync: call ``.item()`` only when you log).
    Unweighted terms are reported (``consistency`` is ``L_MSE`` before
    ``lambda_ * mse_weight``); disabled terms are zero. ``skipped`` is 1 when
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

    ``lambda_ * (mse_weight L_MSE(Z, F) + cov_weight L_COV(Z) + svd_weight L_SVD(Z))``

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
        self.config = _resolve_config(config, overrides)

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
        gathers = cfg.gather_distributed and (cfg.uses_covariance or cfg.uses_spectrum)
        # Under "skip" (or a gather, where the global batch decides) one local row is not an error here.
        NF.validate_features(z, "z", min_rows=1 if cfg.small_batch == "skip" or gathers else 2)
        if cfg.uses_consistency:
            if f is None:
                raise ValueError(
                    "the consistency term needs the reference features f (got None); pass f or set mse_weight=0"
                )
            NF.validate_features(f, "f", min_rows=1)
            if f.shape != z.shape:
                raise ValueError(f"z and f must have the same shape; got z {tuple(z.shape)} and f {tuple(f.shape)}")
            _same_device(z=z, f=f)
        zs = z
        if gathers:
            from nmtune.distributed import all_gather_rows, is_distributed

            if not is_distributed():
                raise ValueError(
                    "gather_distributed=True needs an initialised torch.distributed process group "
                    "(torchrun + dist.init_process_group, or Accelerate); none is initialised"
                )
            sizes = [z.shape[-2]] * torch.distributed.get_world_size() if cfg.equal_local_batches else None
            zs = all_gather_rows(z, sizes=sizes)
        if zs.shape[-2] < 2:
            if cfg.small_batch == "skip":
                return self._skipped(z, return_components)
            NF.validate_features(zs, "z" if zs is z else "the gathered global batch of z")
        if cfg.uses_spectrum and not cfg.clamp_top_k:
            NF.validate_top_k(cfg.top_k, zs.shape)
        if cfg.check_finite:  # one host sync for both tensors
            NF.validate_finite(z, "z", also=f if cfg.uses_consistency else None, also_name="f")

        terms = NF.nmtune_terms(
            *_paired_views(z, f, views) if cfg.uses_consistency else (z, None),  # type: ignore[arg-type]
            covariance=cfg.uses_covariance, singular_value=cfg.uses_spectrum, metrics=return_components,
            top_k=cfg.top_k, mode=cfg.consistency, precision=cfg.precision, statistics_of=zs,
        )
        mse, cov, svd = terms.consistency, terms.covariance, terms.singular_value
        weighted = [w * t.mean() for w, t in ((cfg.mse_weight, mse), (cfg.cov_weight, cov), (cfg.svd_weight, svd))
                    if t is not None]
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
            singular_value=detached(svd), sve=detached(terms.sve), lsvr=detached(terms.lsvr),
            skipped=zero,
        )

    @staticmethod
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
