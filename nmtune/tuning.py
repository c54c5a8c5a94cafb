"""Black-box tuning on cached features: ``fit`` and ``evaluate``.

The backbone (any model, or an embedding API) runs once to produce features
``F``; every epoch of linear probing, MLP tuning or NMTune then runs on that
cache. The recipes are the paper's (Section 4 and Appendix):

* vision: AdamW, 30 epochs, cosine schedule; LP lr 0.1 wd 0; MLP/NMTune lr
  1e-3 wd 1e-4;
* language: AdamW, 10 epochs, linear schedule; LP lr 0.01 wd 0; MLP/NMTune
  lr 1e-3 wd 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from nmtune import functional as NF
from nmtune.head import HEAD_PRESETS, NMTuneHead
from nmtune.loss import NMTuneConfig, NMTuneLoss

__all__ = ["TuningConfig", "FitResult", "fit", "evaluate", "extract_features", "METHODS"]

METHODS = ("lp", "mlp", "nmtune")
SCHEDULES = ("cosine", "linear", "constant")
_RECIPES: dict[str, dict[str, Any]] = {
    "vision": dict(epochs=30, schedule="cosine", lp_lr=0.1, lr=1e-3, weight_decay=1e-4),
    "language": dict(epochs=10, schedule="linear", lp_lr=0.01, lr=1e-3, weight_decay=1e-4),
}


@dataclass(frozen=True)
class TuningConfig:
    """Optimisation recipe for :func:`fit`.

    ``lr`` and ``weight_decay`` left at ``None`` take the method's value from
    ``domain``'s recipe (LP: ``lp_lr``, wd 0; MLP/NMTune: ``1e-3``, ``1e-4``).

    Example:
        >>> TuningConfig.recipe("language", "lp").resolved("lp")
        (0.01, 0.0)
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str = "cosine"
    domain: str = "vision"
    seed: int = 0
    head_preset: str = "paper"
    head_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics); got {self.batch_size}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be None or a finite number >= 0; got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}")
        if self.domain not in _RECIPES:
            raise ValueError(f"domain must be one of {sorted(_RECIPES)}; got {self.domain!r}")
        if self.head_preset not in HEAD_PRESETS:
            raise ValueError(f"head_preset must be one of {sorted(HEAD_PRESETS)}; got {self.head_preset!r}")

    @classmethod
    def recipe(cls, domain: str, method: str = "nmtune", **overrides: Any) -> TuningConfig:
        """The paper's recipe for ``domain`` (``"vision"`` or ``"language"``)."""
        if domain not in _RECIPES:
            raise ValueError(f"domain must be one of {sorted(_RECIPES)}; got {domain!r}")
        _check_method(method)
        r = _RECIPES[domain]
        base: dict[str, Any] = dict(epochs=r["epochs"], schedule=r["schedule"], domain=domain)
        base.update(overrides)
        return cls(**base)

    def resolved(self, method: str) -> tuple[float, float]:
        """``(lr, weight_decay)`` for ``method`` after applying the recipe defaults."""
        _check_method(method)
        r = _RECIPES[self.domain]
        lr = self.lr if self.lr is not None else (r["lp_lr"] if method == "lp" else r["lr"])
        wd = self.weight_decay if self.weight_decay is not None else (0.0 if method == "lp" else r["weight_decay"])
        return float(lr), float(wd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Attributes:
        head: The trained head, in eval mode.
        history: One dict per epoch: ``epoch``, ``loss``, ``lr`` (and, for
            NMTune, the mean of each regularizer term).
        method: ``"lp"``, ``"mlp"`` or ``"nmtune"``.
        loss_config: The regularizer configuration used.
    """

    head: NMTuneHead
    history: list[dict[str, float]]
    method: str
    loss_config: NMTuneConfig


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    return method


def _check_xy(features: Tensor, labels: Tensor, name: str = "features", *, targets: bool = False) -> None:
    """Validate features ``(N, D)`` and labels ``(N,)`` (``targets``: any tensor with N rows)."""
    if not isinstance(features, Tensor) or not features.is_floating_point() or features.dim() != 2:
        got = f"{features.dtype} {tuple(features.shape)}" if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape (N, D); got {got}")
    if targets:
        if not isinstance(labels, Tensor) or labels.dim() < 1:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"targets must be a tensor with one row per sample (N, ...); got {got}")
    elif not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape (N,); got {got}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} has {features.shape[0]} rows but labels has {labels.shape[0]}; expected the same N"
        )
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows; got shape {tuple(features.shape)}")


def _lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        t = min(step, total_steps) / max(1, total_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if schedule == "linear":
            return 1.0 - t
        return 1.0

    return fn


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; a trailing batch of one row joins the previous one."""
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < 2:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(
    features: Tensor,
    labels: Tensor,
    method: str = "nmtune",
    *,
    num_classes: int | None = None,
    config: TuningConfig | None = None,
    loss_config: NMTuneConfig | str | None = None,
    head: NMTuneHead | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    task_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> FitResult:
    """Train a head on cached frozen features with LP, MLP tuning or NMTune.

    Args:
        features: Frozen backbone features ``(N, D)``.
        labels: Class indices ``(N,)``.
        method: ``"lp"`` (linear probe), ``"mlp"`` (MLP, task loss only) or
            ``"nmtune"`` (MLP with the NMTune regularizers).
        num_classes: Defaults to ``labels.max() + 1``.
        config: Optimisation recipe (default: the paper's vision recipe).
        loss_config: Regularizer config or preset for ``"nmtune"`` (default
            ``"paper"``); ignored by ``"lp"``/``"mlp"``, which use ``"none"``.
        head: A head to train instead of one built from ``config.head_preset``.
        progress: Show a tqdm progress bar over epochs.
        checkpoint_dir: Save state after every epoch there and resume from
            it when called again with the same arguments.
        device: Where to train (default: the features' device).
        task_loss: ``callable(logits, targets) -> scalar`` replacing
            cross-entropy (e.g. MSE for a regression task such as STS-B).
            With it, ``labels`` may be any tensor with ``N`` rows (float
            targets included) and ``num_classes`` is the head's output width.

    Returns:
        A :class:`FitResult` with the trained head in eval mode.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 16); y = (x[:, 0] > 0).long()
        >>> res = fit(x, y, "mlp", config=TuningConfig(epochs=10, batch_size=32, lr=1e-2))
        >>> evaluate(res.head, x, y)["accuracy"] > 0.95
        True
    """
    _check_method(method)
    _check_xy(features, labels, targets=task_loss is not None)
    config = config or TuningConfig()
    NF.validate_finite(features, "features")
    device = torch.device(device) if device is not None else features.device
    if task_loss is not None and num_classes is None:
        raise ValueError("with a custom task_loss, pass num_classes (the head's output width)")
    n_classes = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if task_loss is None and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={n_classes}); got range [{int(labels.min())}, {int(labels.max())}]"
        )

    if method == "nmtune":
        loss_cfg = loss_config if isinstance(loss_config, NMTuneConfig) else NMTuneConfig.from_preset(loss_config or "paper")
    else:
        loss_cfg = NMTuneConfig.from_preset("none")
    # Features were checked once above; per-step checks would sync every batch.
    loss_cfg = loss_cfg.replace(check_finite=False)

    torch.manual_seed(config.seed)
    if head is None:
        preset = "linear" if method == "lp" else config.head_preset
        head = NMTuneHead.from_preset(preset, features.shape[1], n_classes, **config.head_kwargs)
    elif method == "lp" and not head.is_linear_probe:
        raise ValueError("method='lp' needs a linear-probe head (NMTuneHead(..., mlp=False))")
    if head.in_features != features.shape[1] or head.num_classes != n_classes:
        raise ValueError(
            f"head expects (in_features={head.in_features}, num_classes={head.num_classes}); "
            f"the data has D={features.shape[1]} and {n_classes} classes"
        )
    head = head.to(device)
    criterion = NMTuneLoss(loss_cfg, task_loss=task_loss).to(device)
    lr, wd = config.resolved(method)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    n = features.shape[0]
    steps_per_epoch = len(_batches(n, config.batch_size, torch.Generator().manual_seed(0)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.schedule, config.epochs * steps_per_epoch)
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0

    ckpt_path: Path | None = None
    signature = json.dumps(
        dict(
            method=method, config=config.to_dict(), loss=loss_cfg.to_dict(), n=n, d=features.shape[1], c=n_classes,
            task_loss=None if task_loss is None else getattr(task_loss, "__qualname__", type(task_loss).__name__),
        ),
        sort_keys=True,
    )
    if checkpoint_dir is not None:
        ckpt_path = Path(checkpoint_dir) / f"fit_{method}.pt"
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
            if state["signature"] != signature:
                raise ValueError(
                    f"checkpoint {ckpt_path} was written by a different fit (method/config/data shape); "
                    "delete it or use another checkpoint_dir"
                )
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            history = state["history"]
            start_epoch = state["epoch"]

    x = features.to(device)
    y = labels.to(device)
    epochs: Iterable[int] = range(start_epoch, config.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, total=config.epochs, initial=start_epoch, desc=f"fit[{method}]")

    keys = ("loss", "consistency", "covariance", "singular_value")
    regularized = loss_cfg.lambda_ > 0
    zeros = torch.zeros((), device=device)
    for epoch in epochs:
        head.train()
        sums = torch.zeros(len(keys), device=device)
        batches = _batches(n, config.batch_size, generator)
        for idx in batches:
            idx = idx.to(device)
            xb, yb = x[idx], y[idx]
            out = head(xb)
            optimizer.zero_grad(set_to_none=True)
            if regularized:
                parts = criterion(out.logits, yb, out.features, xb, return_components=True)
                parts.loss.backward()
                terms = [parts.loss.detach().float(), parts.consistency, parts.covariance, parts.singular_value]
            else:  # no spectrum for the baselines: their step is exactly an MLP/LP step
                loss = criterion.task_loss(out.logits, yb)
                loss.backward()
                terms = [loss.detach().float(), zeros, zeros, zeros]
            optimizer.step()
            scheduler.step()
            sums += torch.stack(terms)
        means = (sums / len(batches)).tolist()  # one host sync per epoch
        record = {"epoch": float(epoch + 1), "lr": float(scheduler.get_last_lr()[0])}
        record.update(zip(keys, means))
        history.append(record)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(
                f"fit[{method}] diverged at epoch {epoch + 1}: loss={record['loss']}; lower the learning rate "
                f"(lr={lr}) or standardise the features"
            )
        if ckpt_path is not None:
            _atomic_save(
                dict(
                    signature=signature,
                    head=head.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    generator=generator.get_state(),
                    history=history,
                    epoch=epoch + 1,
                ),
                ckpt_path,
            )
        if progress:
            epochs.set_postfix(loss=f"{record['loss']:.4f}")  # type: ignore[attr-defined]
    head.eval()
    return FitResult(head=head, history=history, method=method, loss_config=loss_cfg)


def _macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Macro F1 over the classes present in ``target`` or ``pred`` (as sklearn)."""
    tp = torch.bincount(target[pred == target], minlength=num_classes).double()
    pred_count = torch.bincount(pred, minlength=num_classes).double()
    true_count = torch.bincount(target, minlength=num_classes).double()
    denom = pred_count + true_count
    present = denom > 0
    f1 = torch.where(present, 2 * tp / torch.where(present, denom, 1.0), 0.0)
    return f1.sum() / present.sum().clamp_min(1)


@torch.no_grad()
def evaluate(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 1024,
    normalize_rows: bool = False,
) -> dict[str, float]:
    """Accuracy, macro-F1, SVE and LSVR of a head on frozen features.

    SVE and LSVR are those of the tuned features ``Z`` over the whole set
    (float64 spectrum).

    Args:
        head: A module returning ``HeadOutput``-like ``(logits, features)``.
        features: ``(N, D)`` frozen features.
        labels: ``(N,)`` class indices.
        batch_size: Evaluation batch size.
        normalize_rows: L2-normalise rows of ``Z`` before the spectrum (the
            authors' analysis convention).

    Returns:
        ``{"accuracy", "macro_f1", "sve", "lsvr", "n"}`` as Python floats
        (accuracy and F1 in ``[0, 1]``).
    """
    _check_xy(features, labels)
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    logits_all, z_all = [], []
    for start in range(0, features.shape[0], batch_size):
        out = head(features[start : start + batch_size].to(device))
        logits_all.append(out[0])
        z_all.append(out[1])
    head.train(was_training)
    logits = torch.cat(logits_all)
    z = torch.cat(z_all).float()
    y = labels.to(device)
    pred = logits.argmax(dim=-1)
    num_classes = max(int(logits.shape[-1]), int(y.max()) + 1)
    sigma = NF.singular_values(z, normalize_rows=normalize_rows)
    metrics = NF.spectrum_metrics(sigma.double())
    return {
        "accuracy": float((pred == y).double().mean()),
        "macro_f1": float(_macro_f1(pred, y, num_classes)),
        "sve": float(metrics["sve"]),
        "lsvr": float(metrics["lsvr"]),
        "n": float(features.shape[0]),
    }


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run a frozen backbone once over a loader and return ``(features, labels)`` on CPU.

    Args:
        model: The frozen backbone (put in eval mode for the pass).
        loader: Yields ``(inputs, labels)`` batches.
        device: Where to run the model (default: its parameters' device).
        forward: ``forward(model, inputs) -> (B, D)`` features; default
            ``model(inputs)`` flattened to 2-D.

    Returns:
        ``float32`` features ``(N, D)`` and ``int64`` labels ``(N,)``.
    """
    was_training = model.training
    model.eval()
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    feats, labs = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError("loader must yield (inputs, labels) batches")
        inputs, target = batch[0], batch[1]
        inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
        out = forward(model, inputs) if forward is not None else model(inputs)
        if isinstance(out, Tensor) and out.dim() > 2:
            out = out.flatten(1)
        feats.append(out.float().cpu())
        labs.append(torch.as_tensor(target).long().cpu())
    model.train(was_training)
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labs)
