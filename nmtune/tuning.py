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

import numpy as np
import torch
from torch import Tensor, nn

from nmtune import _rows
from nmtune import functional as NF
from nmtune._kernels import gram_singular_values
from nmtune._rows import _Rows, _TensorRows
from nmtune._validation import check_choice, check_features, check_int, check_real, check_tensor
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
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("domain", self.domain, tuple(sorted(_RECIPES)))
        check_choice("head_preset", self.head_preset, tuple(sorted(HEAD_PRESETS)))
        if not isinstance(self.head_kwargs, dict):
            raise TypeError(f"head_kwargs must be a dict of NMTuneHead arguments; got {type(self.head_kwargs).__name__}")

    @classmethod
    def recipe(cls, domain: str, method: str = "nmtune", **overrides: Any) -> TuningConfig:
        """The paper's recipe for ``domain`` (``"vision"`` or ``"language"``)."""
        check_choice("domain", domain, tuple(sorted(_RECIPES)))
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
    return check_choice("method", method, METHODS)  # type: ignore[return-value]


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


def _feature_matrix(features: Any, name: str = "features") -> Tensor:
    """Features ``(N, D)`` of any floating dtype (NumPy arrays accepted); returns the tensor."""
    return check_features(name, _as_tensor(features, name), matrix=True, needs_values=True)


def _check_labels(labels: Any, n: int, name: str = "labels") -> Tensor:
    """Integer class indices ``(N,)``, ``>= 0``; the first offending label is named."""
    labels = check_tensor(name, _as_tensor(labels, name), kind="any", needs_values=True)
    _rows.check_label_block(labels, 0, name)
    if labels.shape[0] != n:
        raise ValueError(f"features has {n} rows but {name} has {labels.shape[0]}; expected the same N")
    return labels


def _check_targets(targets: Any, n: int) -> Tensor:
    targets = check_tensor("labels", _as_tensor(targets, "labels"), kind="any", needs_values=True)
    if targets.dim() < 1 or targets.shape[0] != n:
        raise ValueError(f"labels (the targets of task_loss) must have one row per sample ({n}, ...); got "
                         f"{_rows.describe(targets)}")
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
    """Shuffled index batches; a trailing batch under ``min_rows`` rows joins the previous one.

    The permutation is int32 below 2**31 rows (4 bytes a row: the one per-row cost of a
    streamed epoch); ``torch.randperm`` draws the same order in either dtype.
    """
    perm = torch.randperm(n, generator=generator, dtype=torch.int32 if n < 2**31 else torch.int64)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < min_rows:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _num_batches(n: int, batch_size: int, min_rows: int) -> int:
    """``len(_batches(n, batch_size, ..., min_rows))`` without drawing a permutation."""
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n - (count - 1) * batch_size < min_rows else count


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
               scheduler: Any, fetch: Callable[[Tensor], tuple[Tensor, Tensor]], device: torch.device,
               batches: list[Tensor], components: bool) -> list[float]:
    """One pass over ``batches`` (``fetch(idx)`` gives their rows on ``device``); the mean of each
    history term (one host sync)."""
    head.train()
    sums = torch.zeros(len(_HISTORY_TERMS), device=device)
    for idx in batches:
        xb, yb = fetch(idx)
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
    features: Tensor | np.ndarray | Any,
    labels: Tensor | np.ndarray | None = None,
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

    Features larger than memory stream: a memory-mapped NumPy array
    (``np.load(path, mmap_mode="r")``) or a dataset of ``(features, label)``
    rows is read one shuffled batch at a time and checked (finite features,
    label range) in one chunked pass first, so the private memory of a run is
    a few batches plus 4 bytes a row for the epoch's order, never the array.
    The same seed and rows give the same head as the in-memory path.

    Args:
        features: Frozen backbone features ``(N, D)``: a tensor or NumPy
            array (moved to ``device`` once), a memory-mapped NumPy array, or
            any indexable dataset (``len(ds)``, ``ds[i]``) of
            ``(features (D,), label)`` rows (both streamed).
        labels: Class indices ``(N,)`` in ``[0, num_classes)`` (a tensor or
            NumPy array, memory-mapped too); ``None`` when ``features`` is a
            dataset, whose rows carry their labels.
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
        device: Where to train (default: the features' device; the CPU for
            streamed features).
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
    rows, n_classes = _fit_inputs(features, labels, num_classes, task_loss, dtype, checkpoint_dir is not None)
    config = config if config is not None else TuningConfig()
    if not isinstance(config, TuningConfig):
        raise TypeError(f"config must be a TuningConfig or None; got {type(config).__name__}")
    device = torch.device(device) if device is not None else _default_device(rows)
    loss_cfg = _fit_loss_config(method, loss_config)

    torch.manual_seed(config.seed)
    d = rows.d
    if head is None:  # a new head trains in ``dtype``; a user's head keeps its own
        head = _prepare_head(None, method, config, d, n_classes).to(dtype or rows.dtype)
    run = _Run.start(_prepare_head(head, method, config, d, n_classes).to(device), method, config, loss_cfg, rows.n)
    ckpt = None
    if checkpoint_dir is not None:
        task_name = None if task_loss is None else getattr(task_loss, "__qualname__", type(task_loss).__name__)
        ckpt = _Checkpoint(checkpoint_dir, method, dict(
            method=method, config=config.to_dict(), loss_config=loss_cfg.to_dict(), num_classes=n_classes,
            features=rows.digests[0], labels=rows.digests[1], task_loss=task_name,
            dtype=str(run.dtype)))
        state = ckpt.load(device)
        if state is not None:
            run.load_state_dict(state)
    criterion = NMTuneLoss(loss_cfg, task_loss=task_loss).to(device)
    # Class indices go to cross-entropy as int64 whatever their integer dtype; targets keep theirs.
    label_dtype = torch.long if task_loss is None else None
    run.train(criterion, _fetcher(rows, device, run.dtype, label_dtype), device, ckpt, progress)
    run.head.eval()
    return FitResult(head=run.head, history=run.history, method=method, loss_config=loss_cfg)


def _default_device(rows: _Rows) -> torch.device:
    return rows.x.device if isinstance(rows, _TensorRows) else torch.device("cpu")


def _fetcher(rows: _Rows, device: torch.device, dtype: torch.dtype,
             label_dtype: torch.dtype | None) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``idx -> (features, labels)`` of a batch on ``device``: in-memory rows are moved there once,
    streamed rows a batch at a time (the same values either way: a cast commutes with a gather)."""
    if isinstance(rows, _TensorRows):
        return rows.to(device, dtype, label_dtype).batch

    def fetch(idx: Tensor) -> tuple[Tensor, Tensor]:
        x, y = rows.batch(idx)
        return x.to(device, dtype, non_blocking=True), y.to(device, label_dtype, non_blocking=True)

    return fetch


def _fit_inputs(
    features: Any, labels: Any, num_classes: int | None, task_loss: Callable | None, dtype: torch.dtype | None,
    digest: bool = False,
) -> tuple[_Rows, int]:
    """Checked rows of ``features (N, D)`` with labels or targets ``(N, ...)``, and the head's output width.

    In-memory features are checked whole; streamed ones (a memory-mapped array, a dataset) in one
    chunked pass. With ``digest`` the rows also get their content fingerprints (``rows.digests``).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None; got {dtype!r}")
    if task_loss is not None and num_classes is None:
        raise ValueError("with a custom task_loss, pass num_classes (the head's output width)")
    hint = "Clean or impute them before tuning."
    if _rows.is_streamed(features):
        rows = _rows.rows_of(features, labels)
        if rows.n < 2:
            raise ValueError(f"features needs at least 2 rows to train; got {rows.n}")
        found = _rows.scan(rows, check=True, classes=task_loss is None, digest=digest, hint=hint)
        top = found.max_label
        digests = (found.features_digest, found.labels_digest)
    else:
        features = _feature_matrix(features)
        n = features.shape[0]
        if n < 2:
            raise ValueError(f"features needs at least 2 rows to train; got shape {tuple(features.shape)}")
        labels = _check_targets(labels, n) if task_loss is not None else _check_labels(labels, n)
        NF.validate_finite(features, "features", hint=hint)
        rows = _TensorRows(features, labels)
        top = int(labels.max()) if task_loss is None else -1
        found = _rows.scan(rows, check=False, classes=False, digest=True, hint=hint) if digest else None
        digests = (found.features_digest, found.labels_digest) if found else (None, None)
    n_classes = check_int("num_classes", num_classes if num_classes is not None else top + 1, minimum=1)
    if task_loss is None and top >= n_classes:
        # the first offending label, by its index (a second pass only on this error path)
        for start, _, y in rows.chunks():
            _rows.check_label_block(y, start, num_classes=n_classes)
    rows.digests = digests
    return rows, n_classes


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
        steps = config.epochs * _num_batches(n, config.batch_size, min_rows)
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

    def train(self, criterion: NMTuneLoss, fetch: Callable[[Tensor], tuple[Tensor, Tensor]], device: torch.device,
              ckpt: _Checkpoint | None, progress: bool) -> None:
        """The remaining epochs, each checkpointed; a diverged loss is an error naming the remedy."""
        epochs: Iterable[int] = range(len(self.history), self.config.epochs)
        if progress:
            from tqdm.auto import tqdm

            epochs = tqdm(epochs, total=self.config.epochs, initial=len(self.history), desc=f"fit[{self.method}]")
        for epoch in epochs:
            batches = _batches(self.n, self.config.batch_size, self.generator, self.min_rows)
            means = _run_epoch(self.head, criterion, self.optimizer, self.scheduler, fetch, device, batches,
                               self.components)
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


class _Counts:
    """Accuracy and macro-F1 from per-class counts, accumulated batch by batch."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.c = num_classes
        self.tp, self.pred, self.true = (torch.zeros(num_classes, dtype=torch.long, device=device) for _ in range(3))

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.tp += torch.bincount(target[pred == target], minlength=self.c)
        self.pred += torch.bincount(pred, minlength=self.c)
        self.true += torch.bincount(target, minlength=self.c)

    def accuracy(self) -> float:
        return float(self.tp.sum().double() / self.true.sum().clamp_min(1).double())

    def macro_f1(self) -> float:
        """Macro F1 over the classes present in the targets or the predictions (as sklearn)."""
        tp, denom = self.tp.double(), (self.pred + self.true).double()
        present = denom > 0
        f1 = torch.where(present, 2 * tp / torch.where(present, denom, 1.0), 0.0)
        return float(f1.sum() / present.sum().clamp_min(1))


def _macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Macro F1 over the classes present in ``target`` or ``pred`` (as sklearn)."""
    counts = _Counts(num_classes, pred.device)
    counts.update(pred, target)
    return counts.macro_f1()


class _StreamedSpectrum:
    """Singular values of the stacked rows ``Z`` from ``Z^T Z`` accumulated in float64 (``D x D``):
    the spectrum of a set too large to hold, one batch at a time."""

    def __init__(self, d: int, device: torch.device, normalize_rows: bool) -> None:
        self.g = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.n, self.normalize_rows = 0, normalize_rows

    def update(self, z: Tensor) -> None:
        z = z.detach().double()
        if self.normalize_rows:
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
            z = z / torch.where(norm > 0, norm, 1.0)
        self.g += z.mT @ z
        self.n += z.shape[0]

    def singular_values(self) -> Tensor:
        return gram_singular_values(self.g, self.n)


@torch.no_grad()
def evaluate(
    head: nn.Module,
    features: Tensor | np.ndarray | Any,
    labels: Tensor | np.ndarray | None = None,
    *,
    batch_size: int = 1024,
    normalize_rows: bool = False,
) -> dict[str, float]:
    """Accuracy, macro-F1, SVE and LSVR of a head on frozen features.

    SVE and LSVR are those of the tuned features ``Z`` over the whole set
    (float64 spectrum). Features of any floating dtype and NumPy arrays are
    accepted; they are cast to the head's dtype. Memory-mapped arrays and
    datasets of ``(features, label)`` rows stream a batch at a time (as in
    :func:`fit`): the spectrum then comes from ``Z^T Z`` accumulated in
    float64, equal to the in-memory one to rounding.

    Args:
        head: A module returning ``HeadOutput``-like ``(logits, features)``.
        features: ``(N, D)`` frozen features (tensor or NumPy array, memory-mapped
            or not) or a dataset of ``(features, label)`` rows.
        labels: ``(N,)`` class indices in ``[0, C)``, ``C`` the head's
            number of outputs; ``None`` for a dataset.
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
    check_int("batch_size", batch_size, minimum=1)
    hint = "Clean or impute them before evaluating."
    if _rows.is_streamed(features):
        rows: _Rows = _rows.rows_of(features, labels)
    else:
        x = _feature_matrix(features)
        y = _check_labels(labels, x.shape[0])
        NF.validate_finite(x, "features", hint=hint)
        rows = _TensorRows(x, y)
    was_training = head.training
    head.eval()
    param = next(head.parameters())
    counts = spectrum = None
    z_all: list[Tensor] = []
    try:
        for start, xb, yb in rows.chunks(batch_size):
            if rows.streamed:
                NF.validate_finite(xb, f"features (rows {start}:{start + xb.shape[0]})", hint=hint)
            out = head(xb.to(param.device, param.dtype))
            logits, z = out[0], out[1]
            c = int(logits.shape[-1])
            _rows.check_label_block(yb, start, num_classes=c)
            if counts is None:
                counts = _Counts(c, param.device)
                # a streamed set (or a single row, which has no Gram of rows) accumulates Z^T Z
                gram = rows.streamed or rows.n < 2
                spectrum = _StreamedSpectrum(z.shape[-1], param.device, normalize_rows) if gram else None
            counts.update(logits.argmax(dim=-1), yb.to(param.device, torch.long))
            if spectrum is not None:
                spectrum.update(z)
            else:
                z_all.append(z.float())
    finally:
        head.train(was_training)
    if counts is None:  # pragma: no cover - every source has at least one row
        raise ValueError("features is empty; expected at least one row")
    if spectrum is not None:
        sigma = spectrum.singular_values()
    else:
        sigma = NF.singular_values(torch.cat(z_all), normalize_rows=normalize_rows)
    metrics = NF.spectrum_metrics(sigma.double())
    return {
        "accuracy": counts.accuracy(),
        "macro_f1": counts.macro_f1(),
        "sve": float(metrics["sve"]),
        "lsvr": float(metrics["lsvr"]),
        "n": float(rows.n),
    }


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    path: str | os.PathLike[str] | None = None,
    num_examples: int | None = None,
) -> tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray]:
    """Run a frozen backbone once over a loader and return ``(features, labels)``.

    With ``path`` the features go to disk instead of memory: ``path/features.npy``
    (float32 ``(N, D)``) and ``path/labels.npy`` (int64 ``(N,)``) are written a
    batch at a time through ``np.lib.format.open_memmap``, and ``path/progress.json``
    records, atomically after each batch is flushed, how many batches and rows are
    safely on disk. Calling again with the same ``path`` after a crash or a kill
    skips the batches already written (the loader is iterated, the model is not
    run on them) and continues; a finished extraction returns at once. The loader
    must yield the same batches in the same order each time (no shuffling).

    Args:
        model: The frozen backbone (put in eval mode for the pass).
        loader: Yields ``(inputs, labels)`` batches.
        device: Where to run the model (default: its parameters' device).
        forward: ``forward(model, inputs) -> (B, D)`` features; default
            ``model(inputs)`` flattened to 2-D.
        path: A directory for an on-disk, resumable extraction (created if
            needed); ``None`` (default) returns tensors in memory.
        num_examples: Rows ``N`` of the on-disk arrays; default
            ``len(loader.dataset)``. The loader must yield exactly that many.

    Returns:
        ``float32`` features ``(N, D)`` and ``int64`` labels ``(N,)``: CPU
        tensors, or with ``path`` read-only memory-mapped NumPy arrays (which
        :func:`fit` and :func:`evaluate` stream).

    Example:
        >>> import tempfile
        >>> data = [(torch.randn(4, 3), torch.arange(4)) for _ in range(3)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     x, y = extract_features(nn.Linear(3, 2), data, path=tmp, num_examples=12)
        ...     x.shape, y.shape
        ((12, 2), (12,))
    """
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable(model, inputs) -> Tensor or None; got {type(forward).__name__}")
    if not isinstance(model, nn.Module) and forward is None:
        raise TypeError(f"model must be an nn.Module (or pass forward=); got {type(model).__name__}")
    if device is None:
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    store = _FeatureFile(Path(path), _extract_rows(loader, num_examples)) if path is not None else None
    if store is not None and store.done:
        return store.arrays()
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    feats, labs = [], []
    try:
        for i, batch in enumerate(loader):
            if store is not None and i < store.batches:
                continue  # on disk from an earlier, interrupted call
            x, y = _extract_batch(model, batch, device, forward)
            if store is not None:
                store.write(x, y)
            else:
                feats.append(x)
                labs.append(y)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if store is not None:
        return store.finish()
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labs)


def _extract_batch(model: nn.Module, batch: Any, device: str | torch.device,
                   forward: Callable[[nn.Module, Any], Tensor] | None) -> tuple[Tensor, Tensor]:
    """Features ``(B, D)`` float32 and labels ``(B,)`` int64 of one loader batch, on the CPU."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError("loader must yield (inputs, labels) batches")
    inputs, target = batch[0], batch[1]
    if isinstance(inputs, Tensor) and inputs.is_meta:
        raise ValueError(f"the loader yielded a meta tensor of inputs {tuple(inputs.shape)} (a shape without values)")
    inputs = inputs.to(device) if isinstance(inputs, Tensor) else inputs
    out = forward(model, inputs) if forward is not None else model(inputs)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = _rows.describe(out)
        raise TypeError(f"the backbone (or forward=) must return a floating tensor of features; got {got}; "
                        "pass forward=lambda model, x: model(x).pooler_output (say) to pick one")
    if out.dim() > 2:
        out = out.flatten(1)
    if out.dim() != 2 or out.is_meta:
        raise ValueError(f"the backbone (or forward=) must return (B, D) features with values; got {_rows.describe(out)}"
                         f"{' on the meta device' if out.is_meta else ''}")
    out = out.float().cpu()  # the copy to the host syncs anyway: checking it is free
    NF.validate_finite(out, "the features the backbone (or forward=) returned",
                       hint="Check the model's inputs and dtype (a float16 backbone can overflow).")
    try:
        y = torch.as_tensor(target)
    except (RuntimeError, TypeError, ValueError) as err:
        raise TypeError(f"the loader's labels must be a tensor or a sequence of numbers; got {type(target).__name__}"
                        ) from err
    if y.is_complex() or y.is_meta:
        raise TypeError(f"the loader's labels must be real class indices with values; got {_rows.describe(y)}")
    if y.dim() != 1 or y.shape[0] != out.shape[0]:
        raise ValueError(f"the loader's labels must be one per row, (B,) = ({out.shape[0]},) for features "
                         f"{tuple(out.shape)}; got {_rows.describe(y)}")
    return out, y.long().cpu()


def _extract_rows(loader: Any, num_examples: int | None) -> int:
    if num_examples is not None:
        return check_int("num_examples", num_examples, minimum=1)
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError("extract_features(path=...) needs num_examples: the loader has no .dataset to count")
    return check_int("num_examples", len(dataset), minimum=1)


class _FeatureFile:
    """The on-disk, resumable output of :func:`extract_features` in one directory."""

    def __init__(self, directory: Path, n: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir, self.n = directory, n
        self.features_path, self.labels_path = directory / "features.npy", directory / "labels.npy"
        self.progress_path = directory / "progress.json"
        self.batches = self.rows = 0
        self.dim: int | None = None
        self.x: np.memmap | None = None
        self.y: np.memmap | None = None
        if self.progress_path.exists():
            saved = json.loads(self.progress_path.read_text())
            if saved.get("num_examples") != n:
                raise ValueError(
                    f"{directory} holds an extraction of num_examples={saved.get('num_examples')} rows; this call "
                    f"has num_examples={n}. Use another path or delete it")
            self.batches, self.rows, self.dim = int(saved["batches"]), int(saved["rows"]), int(saved["dim"])
            if not self.done:
                self.x = np.lib.format.open_memmap(self.features_path, mode="r+")
                self.y = np.lib.format.open_memmap(self.labels_path, mode="r+")

    @property
    def done(self) -> bool:
        return self.dim is not None and self.rows == self.n

    def _commit(self) -> None:
        """Flush the rows, then record them (atomically): a row is counted only once it is on disk."""
        self.x.flush()  # type: ignore[union-attr]
        self.y.flush()  # type: ignore[union-attr]
        text = json.dumps(dict(num_examples=self.n, dim=self.dim, rows=self.rows, batches=self.batches))
        tmp = self.progress_path.with_suffix(".json.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.progress_path)

    def write(self, x: Tensor, y: Tensor) -> None:
        if self.x is None:
            self.dim = x.shape[1]
            self.x = np.lib.format.open_memmap(self.features_path, mode="w+", dtype=np.float32, shape=(self.n, self.dim))
            self.y = np.lib.format.open_memmap(self.labels_path, mode="w+", dtype=np.int64, shape=(self.n,))
        if x.shape[1] != self.dim:
            raise ValueError(f"the backbone returned {x.shape[1]} features in batch {self.batches}; earlier batches "
                             f"had {self.dim}")
        stop = self.rows + x.shape[0]
        if stop > self.n:
            raise ValueError(f"the loader yields more than num_examples={self.n} rows (got {stop} by batch "
                             f"{self.batches}); pass the right num_examples")
        self.x[self.rows : stop] = x.numpy()
        self.y[self.rows : stop] = y.numpy()
        self.rows, self.batches = stop, self.batches + 1
        self._commit()

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rows != self.n:
            raise ValueError(f"the loader yielded {self.rows} rows but num_examples={self.n}; pass the right "
                             "num_examples (a loader with drop_last=True yields fewer rows than its dataset)")
        self.x = self.y = None  # close the writable mappings
        return self.arrays()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.load(self.features_path, mmap_mode="r"), np.load(self.labels_path, mmap_mode="r")
