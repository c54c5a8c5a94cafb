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
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from nmtune import functional as NF
from nmtune._validation import check_int, check_real
from nmtune.head import HEAD_PRESETS, NMTuneHead
from nmtune.config import NMTuneConfig, resolve_config
from nmtune.loss import NMTuneLoss

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
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=2)  # the batch statistics need 2 rows
        check_int("seed", self.seed)
        for name in ("lr", "weight_decay"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), minimum=0.0)
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


def _as_tensor(x: Any, name: str) -> Tensor:
    """A tensor from a tensor or a NumPy array (zero-copy where possible)."""
    if isinstance(x, Tensor):
        return x
    try:
        import numpy as np
    except ModuleNotFoundError:  # pragma: no cover - numpy is a dependency
        np = None
    if np is not None and isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got a NumPy array of dtype object")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array; got {type(x).__name__}")


def _describe(x: Tensor) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}"


def _check_features(features: Any, name: str = "features") -> Tensor:
    """Features ``(N, D)`` of any floating dtype (NumPy arrays accepted); returns the tensor."""
    features = _as_tensor(features, name)
    if not features.is_floating_point():
        raise TypeError(f"{name} must be floating-point (N, D) features; got {_describe(features)}")
    if features.dim() != 2 or features.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with D >= 1; got {_describe(features)}")
    if features.shape[0] < 1:
        raise ValueError(f"{name} is empty (got shape {tuple(features.shape)}); expected at least one row")
    return features


def _check_labels(labels: Any, n: int, name: str = "labels", *, num_classes: int | None = None) -> Tensor:
    """Integer class indices ``(N,)`` in ``[0, num_classes)``; the first offending label is named."""
    labels = _as_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices of shape (N,); got {_describe(labels)}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must have shape (N,); got {_describe(labels)}")
    if labels.shape[0] != n:
        raise ValueError(f"features has {n} rows but {name} has {labels.shape[0]}; expected the same N")
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        want = "be class indices >= 0" if num_classes is None else f"lie in [0, num_classes={num_classes})"
        raise ValueError(f"{name} must {want}; got {int(labels[i])} at index {i}")
    return labels


def _check_targets(targets: Any, n: int) -> Tensor:
    targets = _as_tensor(targets, "targets")
    if targets.dim() < 1 or targets.shape[0] != n:
        raise ValueError(f"targets must have one row per sample ({n}, ...); got {_describe(targets)}")
    return targets


def _lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        t = min(step, total_steps) / max(1, total_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if schedule == "linear":
            return 1.0 - t
        return 1.0

    return fn


def _batches(n: int, batch_size: int, generator: torch.Generator, min_rows: int = 2) -> list[Tensor]:
    """Shuffled index batches; a trailing batch under ``min_rows`` rows joins the previous one."""
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < min_rows:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(x: Tensor) -> str:
    """A cheap content hash: shape, dtype, 256 evenly spaced rows and the float64 sum and sum of squares."""
    flat = x.detach().reshape(x.shape[0], -1)
    rows = torch.linspace(0, flat.shape[0] - 1, steps=min(flat.shape[0], 256)).long()
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}".encode())
    h.update(flat[rows].to("cpu", torch.float64).contiguous().numpy().tobytes())
    whole = flat.to(torch.float64)
    h.update(torch.stack([whole.sum(), whole.square().sum()]).cpu().numpy().tobytes())
    return h.hexdigest()[:20]


class _Checkpoint:
    """Per-epoch state of one :func:`fit` in ``checkpoint_dir``, keyed by what the run depends on."""

    def __init__(self, directory: str | os.PathLike[str], method: str, key: dict[str, Any]) -> None:
        self.path = Path(directory) / f"fit_{method}.pt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The saved state, or ``None``; a state written for other data, config or method is an error."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location=device, weights_only=False)
        saved = state.get("key") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint {self.path} was written by an older nmtune; delete it or use another "
                             "checkpoint_dir")
        changed = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
        if changed:
            raise ValueError(
                f"checkpoint {self.path} was written by a different fit (changed: {', '.join(changed)}); resuming it "
                "would return a head trained on other data or settings. Delete it or use another checkpoint_dir"
            )
        return state

    def save(self, **state: Any) -> None:
        _atomic_save(dict(key=self.key, **state), self.path)


def _prepare_head(head: NMTuneHead | None, method: str, config: TuningConfig, d: int, n_classes: int) -> NMTuneHead:
    if head is None:
        preset = "linear" if method == "lp" else config.head_preset
        return NMTuneHead.from_preset(preset, d, n_classes, **config.head_kwargs)
    if not isinstance(head, NMTuneHead):
        raise TypeError(f"head must be an NMTuneHead or None; got {type(head).__name__}")
    if method == "lp" and not head.is_linear_probe:
        raise ValueError("method='lp' needs a linear-probe head (NMTuneHead(..., mlp=False))")
    if head.in_features != d or head.num_classes != n_classes:
        raise ValueError(
            f"head expects (in_features={head.in_features}, num_classes={head.num_classes}); "
            f"the data has D={d} and {n_classes} classes"
        )
    return head


_HISTORY_TERMS = ("loss", "consistency", "covariance", "singular_value")


def _run_epoch(head: NMTuneHead, criterion: NMTuneLoss, optimizer: torch.optim.Optimizer,
               scheduler: Any, x: Tensor, y: Tensor, batches: list[Tensor], components: bool) -> list[float]:
    """One pass over ``batches``; the mean of each history term (one host sync)."""
    head.train()
    sums = torch.zeros(len(_HISTORY_TERMS), device=x.device)
    for idx in batches:
        idx = idx.to(x.device)
        xb, yb = x[idx], y[idx]
        out = head(xb)
        optimizer.zero_grad(set_to_none=True)
        if components:  # the spectrum is computed for the loss anyway, so logging its terms is free
            parts = criterion(out.logits, yb, out.features, xb, return_components=True)
            loss = parts.loss
            terms = torch.stack([loss.detach().float(), parts.consistency.float(), parts.covariance.float(),
                                 parts.singular_value.float()])
        else:  # baselines: the "none" preset adds an exact zero and computes no spectrum
            loss = criterion(out.logits, yb, out.features, xb)
            terms = torch.cat([loss.detach().float().reshape(1), sums.new_zeros(len(_HISTORY_TERMS) - 1)])
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums += terms
    return (sums / len(batches)).tolist()


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
    dtype: torch.dtype | None = torch.float32,
) -> FitResult:
    """Train a head on cached frozen features with LP, MLP tuning or NMTune.

    Features of any floating dtype (float64 from ``torch.from_numpy``,
    float16/bfloat16 from a half-precision backbone) and NumPy arrays are
    accepted; training runs in ``dtype`` (float32 by default). Every sample is
    used every epoch: a trailing batch of one row joins the previous batch.

    Args:
        features: Frozen backbone features ``(N, D)``, a tensor or NumPy array.
        labels: Class indices ``(N,)`` in ``[0, num_classes)``.
        method: ``"lp"`` (linear probe), ``"mlp"`` (MLP, task loss only) or
            ``"nmtune"`` (MLP with the NMTune regularizers).
        num_classes: Defaults to ``labels.max() + 1``.
        config: Optimisation recipe (default: the paper's vision recipe).
        loss_config: Regularizer config or preset for ``"nmtune"`` (default
            ``"paper"``); ignored by ``"lp"``/``"mlp"``, which use ``"none"``.
        head: A head to train instead of one built from ``config.head_preset``
            (trained in its own dtype).
        progress: Show a tqdm progress bar over epochs.
        checkpoint_dir: Save state after every epoch there and resume from
            it when called again. The checkpoint is keyed by the method, both
            configs and a fingerprint of the features and labels: resuming with
            anything else changed raises ``ValueError`` naming what changed.
        device: Where to train (default: the features' device).
        task_loss: ``callable(logits, targets) -> scalar`` replacing
            cross-entropy (e.g. MSE for a regression task such as STS-B).
            With it, ``labels`` may be any tensor with ``N`` rows (float
            targets included) and ``num_classes`` is the head's output width.
        dtype: Training dtype for the features and a new head (default
            ``torch.float32``; ``None`` keeps the features' dtype).

    Returns:
        A :class:`FitResult` with the trained head in eval mode.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 16, dtype=torch.float64); y = (x[:, 0] > 0).long()
        >>> res = fit(x, y, "mlp", config=TuningConfig(epochs=10, batch_size=32, lr=1e-2))
        >>> evaluate(res.head, x, y)["accuracy"] > 0.95
        True
    """
    _check_method(method)
    features, labels, n_classes = _fit_inputs(features, labels, num_classes, task_loss, dtype)
    config = config if config is not None else TuningConfig()
    if not isinstance(config, TuningConfig):
        raise TypeError(f"config must be a TuningConfig or None; got {type(config).__name__}")
    device = torch.device(device) if device is not None else features.device
    loss_cfg = _fit_loss_config(method, loss_config)

    torch.manual_seed(config.seed)
    d = features.shape[1]
    if head is None:  # a new head trains in ``dtype``; a user's head keeps its own
        head = _prepare_head(None, method, config, d, n_classes).to(dtype or features.dtype)
    run = _Run.start(_prepare_head(head, method, config, d, n_classes).to(device), method, config, loss_cfg,
                     len(features))
    ckpt = None
    if checkpoint_dir is not None:
        task_name = None if task_loss is None else getattr(task_loss, "__qualname__", type(task_loss).__name__)
        ckpt = _Checkpoint(checkpoint_dir, method, dict(
            method=method, config=config.to_dict(), loss_config=loss_cfg.to_dict(), num_classes=n_classes,
            features=_fingerprint(features), labels=_fingerprint(labels), task_loss=task_name,
            dtype=str(run.dtype)))
        state = ckpt.load(device)
        if state is not None:
            run.load_state_dict(state)
    criterion = NMTuneLoss(loss_cfg, task_loss=task_loss).to(device)
    run.train(criterion, features.to(device, run.dtype), labels.to(device), ckpt, progress)
    run.head.eval()
    return FitResult(head=run.head, history=run.history, method=method, loss_config=loss_cfg)


def _fit_inputs(
    features: Any, labels: Any, num_classes: int | None, task_loss: Callable | None, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, int]:
    """Checked ``features (N, D)``, labels or targets ``(N, ...)`` and the head's output width."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None; got {dtype!r}")
    features = _check_features(features)
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"features needs at least 2 rows to train; got shape {tuple(features.shape)}")
    if task_loss is not None:
        if num_classes is None:
            raise ValueError("with a custom task_loss, pass num_classes (the head's output width)")
        labels = _check_targets(labels, n)
    else:
        labels = _check_labels(labels, n)
    n_classes = check_int("num_classes", num_classes if num_classes is not None else int(labels.max()) + 1, minimum=1)
    if task_loss is None:
        _check_labels(labels, n, num_classes=n_classes)
    NF.validate_finite(features, "features", hint="Clean or impute them before tuning.")
    return features, labels, n_classes


def _fit_loss_config(method: str, loss_config: NMTuneConfig | str | None) -> NMTuneConfig:
    """The regularizer config ``method`` trains with (``"none"`` for the baselines)."""
    cfg = NMTuneConfig.from_preset("none")
    if method == "nmtune":
        cfg = resolve_config(loss_config, {}, name="loss_config")
    # Features are checked once in fit; per-step checks would sync every batch.
    return cfg.replace(check_finite=False, small_batch="skip")


@dataclass
class _Run:
    """What one :func:`fit` trains and checkpoints: the head, its optimiser and schedule, the shuffling
    generator and the history so far."""

    head: NMTuneHead
    method: str
    config: TuningConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    n: int
    min_rows: int
    components: bool
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, head: NMTuneHead, method: str, config: TuningConfig, loss_cfg: NMTuneConfig, n: int) -> _Run:
        lr, wd = config.resolved(method)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
        # A trailing batch joins the previous one when it is too small for the statistics: under 2 rows,
        # or under top_k rows when L_SVD needs that many singular values (every sample is still used).
        min_rows = max(2, loss_cfg.top_k if loss_cfg.uses_singular_value and not loss_cfg.clamp_top_k else 2)
        steps = config.epochs * len(_batches(n, config.batch_size, torch.Generator().manual_seed(0), min_rows))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.schedule, steps))
        return cls(head, method, config, optimizer, scheduler, torch.Generator().manual_seed(config.seed), n,
                   min_rows, components=loss_cfg.lambda_ > 0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def state_dict(self) -> dict[str, Any]:
        return dict(head=self.head.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), generator=self.generator.get_state(),
                    history=self.history, epoch=len(self.history))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])

    def train(self, criterion: NMTuneLoss, x: Tensor, y: Tensor, ckpt: _Checkpoint | None, progress: bool) -> None:
        """The remaining epochs, each checkpointed; a diverged loss is an error naming the remedy."""
        epochs: Iterable[int] = range(len(self.history), self.config.epochs)
        if progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, total=self.config.epochs, initial=len(self.history), desc=f"fit[{self.method}]")
        for epoch in epochs:
            batches = _batches(self.n, self.config.batch_size, self.generator, self.min_rows)
            means = _run_epoch(self.head, criterion, self.optimizer, self.scheduler, x, y, batches, self.components)
            record = {"epoch": float(epoch + 1), "lr": float(self.scheduler.get_last_lr()[0]),
                      **dict(zip(_HISTORY_TERMS, means))}
            self.history.append(record)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"fit[{self.method}] diverged at epoch {epoch + 1}: loss={record['loss']}; lower the learning "
                    f"rate (lr={self.config.resolved(self.method)[0]}) or standardise the features"
                )
            if ckpt is not None:
                ckpt.save(**self.state_dict())
            if progress:
                epochs.set_postfix(loss=f"{record['loss']:.4f}")  # type: ignore[attr-defined]


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
    (float64 spectrum). Features of any floating dtype and NumPy arrays are
    accepted; they are cast to the head's dtype.

    Args:
        head: A module returning ``HeadOutput``-like ``(logits, features)``.
        features: ``(N, D)`` frozen features (tensor or NumPy array).
        labels: ``(N,)`` class indices in ``[0, C)``, ``C`` the head's
            number of outputs.
        batch_size: Evaluation batch size.
        normalize_rows: L2-normalise rows of ``Z`` before the spectrum (the
            authors' analysis convention).

    Returns:
        ``{"accuracy", "macro_f1", "sve", "lsvr", "n"}`` as Python floats
        (accuracy and F1 in ``[0, 1]``; macro-F1 as scikit-learn's
        ``f1_score(average="macro")``).
    """
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module returning (logits, features); got {type(head).__name__}")
    features = _check_features(features)
    labels = _check_labels(labels, features.shape[0])
    check_int("batch_size", batch_size, minimum=1)
    NF.validate_finite(features, "features", hint="Clean or impute them before evaluating.")
    was_training = head.training
    head.eval()
    param = next(head.parameters())
    logits_all, z_all = [], []
    for start in range(0, features.shape[0], batch_size):
        out = head(features[start : start + batch_size].to(param.device, param.dtype))
        logits_all.append(out[0])
        z_all.append(out[1])
    head.train(was_training)
    logits = torch.cat(logits_all)
    z = torch.cat(z_all).float()
    y = _check_labels(labels, features.shape[0], num_classes=int(logits.shape[-1])).to(param.device)
    pred = logits.argmax(dim=-1)
    sigma = NF.singular_values(z, normalize_rows=normalize_rows)
    metrics = NF.spectrum_metrics(sigma.double())
    return {
        "accuracy": float((pred == y).double().mean()),
        "macro_f1": float(_macro_f1(pred, y, int(logits.shape[-1]))),
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
        if not isinstance(out, Tensor) or not out.is_floating_point():
            got = _describe(out) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"the backbone (or forward=) must return a floating tensor of features; got {got}; "
                            "pass forward=lambda model, x: model(x).pooler_output (say) to pick one")
        if out.dim() > 2:
            out = out.flatten(1)
        feats.append(out.float().cpu())
        labs.append(torch.as_tensor(target).long().cpu())
    model.train(was_training)
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labs)
