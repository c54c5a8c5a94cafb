"""Downstream protocol on frozen features: LP, MLP tuning and NMTune (+ LoRA rows).

For one pre-trained backbone, features of every task's train and test sets are
computed once and cached; heads are then tuned on the cache with ``nmtune.fit``
(the paper's vision recipe: AdamW, 30 epochs, cosine; LP lr 0.1, MLP/NMTune lr 1e-3
wd 1e-4) for several seeds and downstream data fractions, and scored with
``nmtune.evaluate`` (accuracy, macro-F1, SVE, LSVR). In-domain tasks train on their
train split and test on their test split; out-of-domain tasks train on one domain
and test on each of the others.

Offline default (the glyph/digit tasks of ``nmtune_study.data.vision``)::

    python examples/evaluate.py --backbone runs/reproduce/pretrain/g05/model.pt \\
        --out runs/eval/g05

Paper scale (a timm model by name, real datasets by path)::

    python examples/evaluate.py --arch resnet50 --backbone /ckpt/resnet50_noise5.pth \\
        --task cifar100:/data/cifar --task folder:/data/dtd \\
        --task domains:/data/domainnet:real --task domains:/data/domainnet:sketch \\
        --fractions 0.1 0.25 0.5 0.75 1.0 --seeds 0 1 2 --out runs/eval/rn50_g05

LoRA and LoRA+NMTune rows (``--lora``) fine-tune the backbone end to end through
``nmtune.lora.wrap_lora`` (LoRA on the backbone; the NMTune COV and SVD terms on the
adapted features) and are off by default (slow on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from nmtune import NMTuneConfig, TuningConfig, evaluate, extract_features, fit
from nmtune.analysis import feature_spectrum, spectrum_summary
from nmtune.noise import symmetric_noise
from nmtune_study import pretrain as pt
from nmtune_study.common import SPECTRUM_NORMALIZE_ROWS, atomic_write_text, cached, flat, noise_ratio, seed_list
from nmtune_study.data import vision as vd
from nmtune_study.report.markdown import model_table

__all__ = [
    "task_features",
    "subsample",
    "validation_split",
    "lr_grid",
    "select_lr",
    "regularizer_scale",
    "TuneSettings",
    "tune_and_score",
    "backbone_metrics",
    "spectrum_values",
    "run_evaluation",
    "main", "parser", "run",
]

METHODS = ("lp", "mlp", "nmtune")


def _loader(ds, batch_size: int, workers: int = 0):
    src = vd.tensor_source(ds)
    if src is not None:
        return vd.TensorBatches(ds, batch_size, None)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers)


def task_features(
    model: torch.nn.Module,
    task: vd.ImageTask,
    cache_file: str | os.PathLike | None,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Frozen penultimate features of ``task``'s train set and every test set, cached in
    ``cache_file`` (computed once per backbone and task).

    Returns:
        ``{"train": (F, y), "tests": {domain: (F, y)}, "num_classes": int, "kind": str}``.
    """
    def extract() -> dict[str, Any]:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = model.to(dev).eval()

        def run(ds):
            return extract_features(net, _loader(ds, batch_size, workers), device=dev, forward=pt.backbone_features)

        return {"train": run(task.train), "tests": {k: run(v) for k, v in task.tests.items()},
                "num_classes": task.num_classes, "kind": task.kind, "name": task.name}

    return cached(cache_file, extract)


def subsample(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Stratified subset of indices holding ``fraction`` of each class (at least one).

    Example:
        >>> len(subsample(torch.arange(100) % 4, 0.2, 0))
        20
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, int(round(fraction * len(idx))))
        keep.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(keep)).values


PROTOCOLS = ("selected", "paper")
#: The learning-rate grid of the ``selected`` protocol: the paper's value times these
#: factors (fixed before any result was looked at; one decade each side).
LR_FACTORS = (0.1, 1.0, 10.0)


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """What :func:`tune_and_score` runs on cached features.

    Attributes:
        methods: Subset of ``("lp", "mlp", "nmtune")``.
        seeds: Tuning seeds (each also draws the data subset).
        fractions: Downstream training-data fractions in ``(0, 1]``.
        epochs: Tuning epochs (the paper's vision recipe otherwise).
        loss_config: The NMTune preset or config for the ``nmtune`` rows.
        batch_size: Tuning batch size.
        label_noise: Symmetric noise ratio put on the *downstream* training labels of
            in-domain tasks (seeded by the tuning seed); 0 keeps them clean.
        normalize_rows: Spectral metrics on L2-normalised rows
            (``nmtune_study.common.SPECTRUM_NORMALIZE_ROWS``, shared with the language study).
        protocols: ``"paper"``: the paper's learning rate; ``"selected"``: the learning
            rate of :data:`LR_FACTORS` x the paper's with the best accuracy on a validation
            split carved from the task's training data (:func:`validation_split`), chosen
            before any test set is read. Each record names its ``protocol`` and ``lr``.
        val_fraction: Share of each class's training rows held out for the selection.
    """

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (1.0,)
    epochs: int = 30
    loss_config: NMTuneConfig | str = "paper"
    batch_size: int = 256
    label_noise: float = 0.0
    normalize_rows: bool = SPECTRUM_NORMALIZE_ROWS
    protocols: tuple[str, ...] = ("paper",)
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("methods", "seeds", "fractions", "protocols"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}; got {self.methods!r}")
        if not self.protocols or set(self.protocols) - set(PROTOCOLS):
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}; got {self.protocols!r}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")

    def as_record(self) -> dict[str, Any]:
        """The JSON-able form stored in ``results.json`` (the resume check compares it)."""
        cfg = self.loss_config
        return dict(methods=list(self.methods), seeds=list(self.seeds), fractions=list(self.fractions),
                    epochs=self.epochs, loss_config=cfg if isinstance(cfg, str) else cfg.to_dict(),
                    tune_batch_size=self.batch_size, label_noise=self.label_noise,
                    normalize_rows=self.normalize_rows, protocols=list(self.protocols),
                    val_fraction=self.val_fraction, lr_factors=list(LR_FACTORS))

    def recipe(self, method: str, seed: int, lr: float | None = None) -> TuningConfig:
        """The :class:`~nmtune.TuningConfig` of one fit (the paper's learning rate by default)."""
        return TuningConfig.recipe("vision", method, epochs=self.epochs, seed=seed, batch_size=self.batch_size,
                                   lr=lr)


def validation_split(labels: torch.Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified ``(fit, validation)`` split of a task's *training* rows.

    Each class with at least two rows gives ``round(fraction * n)`` of them (at least one,
    never all) to the validation part. The split depends only on the labels and ``seed``,
    so every method and every tuning seed of a task is selected on the same rows.

    Example:
        >>> fit_idx, val_idx = validation_split(torch.arange(20) % 4, 0.25)
        >>> len(fit_idx), len(val_idx), set(fit_idx.tolist()) & set(val_idx.tolist())
        (16, 4, set())
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    g = torch.Generator().manual_seed(seed)
    fit_idx, val_idx = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(fraction * len(idx))))
        val_idx.append(idx[:k])
        fit_idx.append(idx[k:])
    return torch.sort(torch.cat(fit_idx)).values, torch.sort(torch.cat(val_idx)).values


def lr_grid(method: str) -> tuple[float, ...]:
    """The learning rates the ``selected`` protocol tries for ``method`` (the paper's value included).

    Example:
        >>> lr_grid("lp")
        (0.01, 0.1, 1.0)
    """
    paper = TuningConfig.recipe("vision", method).resolved(method)[0]
    return tuple(float(f"{paper * f:.3g}") for f in LR_FACTORS)


def select_lr(x: torch.Tensor, y: torch.Tensor, method: str, *, num_classes: int, settings: TuneSettings,
              seed: int = 0) -> dict[str, Any]:
    """The learning rate of :func:`lr_grid` with the best validation accuracy.

    Only the task's training rows ``(x, y)`` come in: they are split by
    :func:`validation_split`, each learning rate is fitted on the fit part (tuning seed
    ``seed``) and scored on the validation part. Ties go to the paper's value, then to the
    smaller rate.

    Returns:
        ``{"lr": chosen, "val_accuracy": {lr: accuracy}}``.
    """
    fit_idx, val_idx = validation_split(y, settings.val_fraction, seed=0)
    paper = settings.recipe(method, seed).resolved(method)[0]
    scores: dict[float, float] = {}
    for lr in lr_grid(method):
        res = fit(x[fit_idx], y[fit_idx], method, num_classes=num_classes, config=settings.recipe(method, seed, lr),
                  loss_config=settings.loss_config if method == "nmtune" else None)
        with torch.no_grad():
            pred = res.head(x[val_idx]).logits.argmax(-1)
        scores[lr] = float((pred == y[val_idx]).double().mean())
    best = max(scores.values())
    tied = [lr for lr, v in scores.items() if v == best]
    lr = paper if paper in tied else min(tied)
    return {"lr": lr, "val_accuracy": {str(k): v for k, v in scores.items()}}


def regularizer_scale(history: Sequence[dict[str, float]], loss_config: NMTuneConfig | str) -> dict[str, Any]:
    """Each NMTune term against the task loss at the first and last epoch of a fit.

    ``history`` is :attr:`nmtune.FitResult.history` (epoch means of the total loss and of
    each unweighted term). The task loss is the total minus ``lambda_ * sum(weight * term)``;
    ``unweighted`` is term / task loss, ``weighted`` is ``lambda_ * weight * term`` / task loss.

    Example:
        >>> h = [{"loss": 1.01, "consistency": 1.0, "covariance": 0.0, "singular_value": 0.0}]
        >>> regularizer_scale(h, "paper")["first"]["consistency"]["weighted"]
        0.01
    """
    cfg = NMTuneConfig.from_preset(loss_config) if isinstance(loss_config, str) else loss_config
    weights = {"consistency": cfg.consistency_weight, "covariance": cfg.covariance_weight,
               "singular_value": cfg.singular_value_weight}
    out: dict[str, Any] = {}
    for name, h in (("first", history[0]), ("last", history[-1])):
        reg = cfg.lambda_ * sum(w * h[t] for t, w in weights.items())
        task = h["loss"] - reg
        out[name] = {"task": task, **{t: {"value": h[t], "unweighted": h[t] / task if task else float("nan"),
                                          "weighted": cfg.lambda_ * w * h[t] / task if task else float("nan")}
                                      for t, w in weights.items()}}
    return out


def tune_and_score(
    feats: dict[str, Any],
    *,
    gamma: float,
    settings: TuneSettings = TuneSettings(),
    spectra: dict[str, list[float]] | None = None,
    pretrain_seed: int = 0,
    regime: str = "supervised",
) -> list[dict[str, Any]]:
    """Tune each method on cached features for every seed and data fraction; one record
    per (protocol, method, seed, fraction, test domain) in the study's record schema (:mod:`nmtune_study.report.records`), with the
    ``lr`` used and the final training loss (``train_loss``; NMTune rows also carry
    ``regularizer_scale``). With ``spectra`` given, the singular values of the tuned
    features ``Z`` on the first test set (first seed, full data, first protocol) are stored
    there under the method's name. With ``settings.label_noise`` > 0, the training labels
    of in-domain tasks get that much symmetric noise (seed ``1000 + seed``).

    The ``selected`` protocol picks each method's learning rate (:func:`select_lr`) from
    the training rows alone, for all methods, before any test set is read."""
    (x, y), k = feats["train"], feats["num_classes"]
    seeds, fractions = settings.seeds, settings.fractions
    selection = ({m: select_lr(x, y, m, num_classes=k, settings=settings) for m in settings.methods}
                 if "selected" in settings.protocols else {})
    records = []
    for frac in fractions:
        for seed in seeds:
            idx = subsample(y, frac, seed)
            y_fit = y[idx]
            if settings.label_noise > 0 and feats["kind"] == "id":
                y_fit = symmetric_noise(y_fit, settings.label_noise, num_classes=k, seed=1000 + seed).labels
            for method in settings.methods:
                fits: dict[float, Any] = {}  # one fit per learning rate, shared by the protocols that use it
                for protocol in settings.protocols:
                    cfg = settings.recipe(method, seed, selection[method]["lr"] if protocol == "selected" else None)
                    lr = cfg.resolved(method)[0]
                    if lr not in fits:
                        fits[lr] = fit(x[idx], y_fit, method, num_classes=k, config=cfg,
                                       loss_config=settings.loss_config if method == "nmtune" else None)
                    res = fits[lr]
                    extra: dict[str, Any] = {"protocol": protocol, "lr": lr, "train_loss": res.history[-1]["loss"]}
                    if protocol == "selected":
                        extra["lr_val_accuracy"] = selection[method]["val_accuracy"]
                    if method == "nmtune":
                        extra["regularizer_scale"] = regularizer_scale(res.history, res.loss_config)
                    for dom, (xt, yt) in feats["tests"].items():
                        m = evaluate(res.head, xt, yt, normalize_rows=settings.normalize_rows)
                        records.append(dict(regime=regime, gamma=gamma, pretrain_seed=pretrain_seed, method=method,
                                            kind=feats["kind"], task=feats["name"], domain=dom, seed=seed,
                                            fraction=frac, **{key: m[key] for key in ("accuracy", "macro_f1", "sve",
                                                                                      "lsvr")}, **extra))
                        if (spectra is not None and seed == seeds[0] and frac == max(fractions)
                                and protocol == settings.protocols[0] and method not in spectra):
                            with torch.no_grad():
                                z = res.head(xt).features
                            spectra[method] = spectrum_values(z, normalize_rows=settings.normalize_rows)
    return records


def spectrum_values(z: torch.Tensor, *, normalize_rows: bool = SPECTRUM_NORMALIZE_ROWS) -> list[float]:
    """Singular values of ``z`` as a list (for the spectra figures).

    Example:
        >>> [round(v, 3) for v in spectrum_values(torch.eye(2))]
        [1.0, 1.0]
    """
    return feature_spectrum(z.float(), normalize_rows=normalize_rows).tolist()


def backbone_metrics(all_feats: Sequence[dict[str, Any]], *,
                     normalize_rows: bool = SPECTRUM_NORMALIZE_ROWS) -> dict[str, Any]:
    """SVE of the frozen features on ID test sets and LSVR on OOD target domains (Figure 3):
    per task and averaged (rows L2-normalised by default, the authors' convention)."""
    per: dict[str, dict[str, float]] = {}
    id_sve, ood_lsvr = [], []
    for f in all_feats:
        for dom, (xt, _) in f["tests"].items():
            s = spectrum_summary(xt, normalize_rows=normalize_rows)
            per[f"{f['name']}/{dom}"] = s
            (id_sve if f["kind"] == "id" else ood_lsvr).append(s["sve" if f["kind"] == "id" else "lsvr"])
    out: dict[str, Any] = {"per_test_set": per}
    if id_sve:
        out["id_sve"] = sum(id_sve) / len(id_sve)
    if ood_lsvr:
        out["ood_lsvr"] = sum(ood_lsvr) / len(ood_lsvr)
    return out


def _lora_records(backbone_path: str, tasks: Sequence[vd.ImageTask], gamma: float, *, epochs: int, seeds,
                  batch_size: int = 128) -> list[dict[str, Any]]:
    """LoRA and LoRA+NMTune rows: end-to-end tuning of the backbone's LoRA adapters."""
    try:
        from nmtune.lora import wrap_lora
    except ImportError as err:  # pragma: no cover - depends on the checkout
        raise ModuleNotFoundError(f"--lora needs nmtune.lora.wrap_lora ({err}); pip install \"nmtune[lora]\"") from err
    from nmtune import NMTuneRegularizer

    records = []
    for task in tasks:
        for seed in seeds:
            for method in ("lora", "lora+nmtune"):
                torch.manual_seed(seed)
                model = pt.load_backbone(backbone_path)
                # The authors' LoRA variant uses COV and SVD only: no consistency term, so no reference F
                # is needed at all (no adapter-disabled forward, nothing to cache). A ragged last batch
                # of one row trains on its task loss (small_batch="skip").
                wrapped = wrap_lora(model, r=8, num_classes=task.num_classes, compute_reference=False)
                reg = NMTuneRegularizer("official", consistency_weight=0.0, small_batch="skip") if method == "lora+nmtune" \
                    else None
                params = [p for p in wrapped.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
                g = torch.Generator().manual_seed(seed)
                src = vd.tensor_source(task.train)
                train_iter = (lambda: vd.TensorBatches(task.train, batch_size, g)) if src is not None else (
                    lambda: DataLoader(task.train, batch_size=batch_size, shuffle=True, generator=g))
                for _ in range(epochs):
                    wrapped.train()
                    for xb, yb in train_iter():
                        out = wrapped(xb)
                        loss = torch.nn.functional.cross_entropy(out.logits, yb)
                        if reg is not None:
                            loss = loss + reg(out.features)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                wrapped.eval()
                for dom, ds in task.tests.items():
                    logits, zs, ys = [], [], []
                    with torch.no_grad():
                        for xb, yb in _loader(ds, 512):
                            out = wrapped(xb)
                            logits.append(out.logits)
                            zs.append(out.features)
                            ys.append(torch.as_tensor(yb))
                    head = _FixedOutputs(torch.cat(logits), torch.cat(zs))
                    yt = torch.cat(ys)
                    m = evaluate(head, torch.arange(len(yt), dtype=torch.float32)[:, None], yt,
                                 normalize_rows=SPECTRUM_NORMALIZE_ROWS)
                    records.append(dict(regime="supervised", gamma=gamma, method=method, kind=task.kind,
                                        task=task.name, domain=dom,
                                        seed=seed, fraction=1.0, **{k: m[k] for k in ("accuracy", "macro_f1", "sve", "lsvr")}))
    return records


class _FixedOutputs(torch.nn.Module):
    """Replays precomputed ``(logits, features)`` so ``nmtune.evaluate`` scores them."""

    def __init__(self, logits: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.z = logits, features
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor):
        i = idx[:, 0].long()
        return self.logits[i], self.z[i]


def run_evaluation(
    backbone_path: str | os.PathLike,
    tasks: Sequence[vd.ImageTask],
    out_dir: str | os.PathLike,
    *,
    gamma: float,
    tuning: TuneSettings = TuneSettings(),
    lora: bool = False,
    lora_epochs: int = 3,
    feature_cache: str | os.PathLike | None = None,
    batch_size: int = 256,
    arch: str | None = None,
    workers: int = 0,
    pretrain_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate one backbone on ``tasks``; writes ``results.json`` and ``table.md`` in
    ``out_dir`` and returns the results (skipped when ``results.json`` already holds
    the same settings). ``batch_size`` is the feature-extraction batch size;
    ``tuning`` says what is tuned on the cached features."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(gamma=gamma, pretrain_seed=pretrain_seed, **tuning.as_record(), lora=lora,
                    tasks=[t.name for t in tasks])
    res_file = out / "results.json"
    if res_file.exists():
        prev = json.loads(res_file.read_text())
        if prev.get("settings") == settings:
            return prev
    t0 = time.time()
    cache = pathlib.Path(feature_cache) if feature_cache is not None else out / "features"
    model = pt.load_backbone(backbone_path, arch=arch)
    feats = [task_features(model, t, cache / f"{t.name}.pt", batch_size=batch_size, workers=workers) for t in tasks]
    t_feat = time.time() - t0
    records, spectra = [], {}
    for f in feats:
        sp: dict[str, list[float]] = {}
        records += tune_and_score(f, gamma=gamma, settings=tuning, spectra=sp, pretrain_seed=pretrain_seed)
        sp["backbone"] = spectrum_values(next(iter(f["tests"].values()))[0], normalize_rows=tuning.normalize_rows)
        spectra[f["name"]] = sp
    if lora:
        records += [dict(r, pretrain_seed=pretrain_seed) for r in _lora_records(
            str(backbone_path), tasks, gamma, epochs=lora_epochs, seeds=tuning.seeds)]
    bm = backbone_metrics(feats, normalize_rows=tuning.normalize_rows)
    # per-task points (backbone metric, LP accuracy at full data) for the Figure 3 scatter
    points: dict[str, list] = {"id_points": [], "ood_points": []}
    for f in feats:
        for dom in f["tests"]:
            accs = [r["accuracy"] for r in records if r["task"] == f["name"] and r["domain"] == dom
                    and r["method"] == "lp" and r["fraction"] == max(tuning.fractions)]
            if accs:
                key = "sve" if f["kind"] == "id" else "lsvr"
                points[f"{f['kind']}_points"].append((bm["per_test_set"][f"{f['name']}/{dom}"][key], sum(accs) / len(accs)))
    bm.update(points)
    result = {"settings": settings, "records": records, "backbone": bm, "spectra": spectra,
              "seconds": {"features": t_feat, "total": time.time() - t0}}
    (out / "table.md").write_text(model_table(records, title=f"noise {100 * gamma:g}%"))
    atomic_write_text(res_file, json.dumps(result, indent=1))
    return result



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", required=True, help="model.pt written by pretrain.py")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default=None, help="timm name when --backbone is a plain timm checkpoint or 'hub'")
    p.add_argument("--gamma", type=noise_ratio, default=None,
                   help="noise ratio of the backbone as a fraction (default: from model.pt)")
    p.add_argument("--task", action="append", default=[],
                   help="task spec (cifar10:ROOT, folder:ROOT, domains:ROOT:SOURCE, variants:TRAIN:V1,V2); "
                        "default: the offline tasks")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--download", action="store_true")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=seed_list, default=[[0, 1, 2]], help="tuning seeds (3,4,5 or 3 4 5)")
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tune-batch-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for feature extraction")
    p.add_argument("--loss-preset", default="paper")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--lora-epochs", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    tasks = ([vd.parse_task_spec(s, image_size=a.image_size, download=a.download) for s in a.task]
             if a.task else vd.offline_tasks(tiny=a.tiny))
    if a.gamma is not None:
        gamma = a.gamma
    elif a.arch is not None:
        raise ValueError("--arch checkpoints carry no noise ratio; pass --gamma")
    else:
        gamma = float(torch.load(a.backbone, weights_only=False).get("noise", 0.0))
    tuning = TuneSettings(methods=a.methods, seeds=flat(a.seeds), fractions=a.fractions, epochs=a.epochs,
                          loss_config=a.loss_preset, batch_size=a.tune_batch_size)
    return run_evaluation(a.backbone, tasks, a.out, gamma=gamma, tuning=tuning, lora=a.lora,
                          lora_epochs=a.lora_epochs, arch=a.arch, batch_size=a.batch_size, workers=a.workers)


def main(argv: list[str] | None = None) -> int:
    """``python examples/evaluate.py``, ``python -m nmtune_study.evaluate``: :func:`run`, then print
    its table; exit status 0."""
    res = run(argv)
    print(model_table(res["records"], title=f"noise {100 * res['settings']['gamma']:g}%"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
