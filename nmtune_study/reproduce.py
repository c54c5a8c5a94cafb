"""The paper's study end to end: noisy pre-training, ID/OOD evaluation, claims with intervals.

One command runs, for every noise ratio gamma in {0, 5, 10, 20, 30} % and every
pre-training seed (``--pretrain-seeds``, default 0 1 2):

1. supervised pre-training with symmetric label noise gamma (``pretrain.py``);
2. frozen-feature extraction on the ID and OOD tasks (cached per model and task);
3. LP, MLP tuning and NMTune for every tuning seed (``--seeds``) (``evaluate.py``);
4. the paper's ablations that fit the budget (``--full``: all of them);

then decides each of the paper's claims from *paired* differences (same pre-trained
model, tuning seed and data split) with a 95 % interval from a hierarchical bootstrap
that resamples pre-training seeds first, then tuning seeds (``report/stats.py``): reproduced
(the interval excludes 0 in the paper's direction), contradicted (it excludes 0 the
other way) or inconclusive. ``report.md`` shows every estimate with its interval;
``claims.json`` holds them as data. Finished stages are skipped on rerun.

``--regime contrastive`` runs the contrastive (CLIP-style) regime of
``examples/contrastive.py`` through the same claim code; ``--regime all`` runs both,
one report section per regime.

Offline default (no downloads; see examples/README.md for the measured time)::

    python examples/reproduce_paper.py                  # -> runs/reproduce/report.md
    python examples/reproduce_paper.py --full           # every ablation (resumable)
    python examples/reproduce_paper.py --tiny --out /tmp/t    # seconds, for tests
    python examples/reproduce_paper.py --seeds 3,4,5 --pretrain-seeds 3,4,5   # other seeds
    python examples/reproduce_paper.py --refresh-results      # also copy to examples/results/

Paper scale (ImageNet-1K pre-training of ResNet-50, real downstream datasets)::

    python examples/reproduce_paper.py --dataset imagenet --data-root /data/imagenet \\
        --arch resnet50 --pretrain-epochs 90 --pretrain-batch-size 256 --image-size 224 \\
        --task cifar10:/data/cifar --task cifar100:/data/cifar --task folder:/data/dtd \\
        --task domains:/data/domainnet:real --task domains:/data/domainnet:sketch \\
        --fractions 0.1 0.25 0.5 0.75 1.0 --tune-batch-size 256 --out runs/paper
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import shlex
import shutil
import sys
import time
from typing import Any, Callable

import torch

from nmtune import NMTuneConfig
from nmtune_study import contrastive
from nmtune_study import language as language_study
from nmtune_study import evaluate as ev
from nmtune_study import pretrain as pt
from nmtune_study.common import atomic_write_text, cached, committed_results, cpu_seconds, flat, noise_ratio, \
    positive_int, run_cells, seed_list
from nmtune_study.data import vision as vd
from nmtune_study.report.assemble import write_report

__all__ = ["ABLATIONS", "PROFILES", "main", "parser", "refresh_results", "run"]

GAMMAS = (0.0, 0.05, 0.10, 0.20, 0.30)
REGIMES = ("supervised", "contrastive", "all")
ABLATIONS = ("terms", "top_k", "fractions", "label_noise", "asymmetric", "lambda")
LAMBDAS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
#: The two offline profiles. ``faithful`` models the paper's regime: pre-training long
#: enough to memorise the noisy labels (the rule is in ``PRETRAIN_RULE``), five
#: pre-training seeds, learning rates selected on a validation split, a CLIP that learned.
#: ``default`` is the same pipeline reduced to fit 15 minutes on two cores; its report
#: says at the top what differs.
PROFILES: dict[str, dict[str, Any]] = {
    "faithful": dict(gammas=list(GAMMAS), pretrain_seeds=[0, 1, 2, 3, 4], seeds=[0, 1], pretrain_epochs=30,
                     pretrain_per_char=40, pretrain_channels_last=False, protocols=["selected", "paper"],
                     ablations=["lambda"],
                     clip=dict(per_font=4, epochs=20, batch_size=64)),
    "default": dict(gammas=list(GAMMAS), pretrain_seeds=[0, 1, 2], seeds=[0, 1], pretrain_epochs=30,
                    pretrain_per_char=20, pretrain_channels_last=True, protocols=["selected", "paper"],
                    ablations=[],
                    clip=dict(per_font=4, epochs=20, batch_size=64)),
}
PRETRAIN_RULE = (
    "Pre-training length, fixed before any downstream result was looked at: the supervised models train for "
    "the smallest number of epochs in (20, 30, 40) at which a calibration model (noise 30 %, pre-training seed "
    "100, not a study seed, the faithful profile's data) predicts at least 90 % of its flipped training labels "
    "as their noisy label at the end of its schedule: 20 epochs: memorised 0.797; 30 epochs: memorised 0.999 "
    "(`python examples/pretrain.py --noise 0.3 --seed 100 --per-char 40 --epochs E`; metrics in "
    "`examples/results/calibration/`). The pre-training set is 40 renderings per character, half the 80 of "
    "the 0.2 study: a smaller set fits its labels in fewer steps, which brings five seeds per noise ratio "
    "into the budget.")


def _tag(gamma: float) -> str:
    return f"g{round(100 * gamma):02d}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce, or runs/reproduce-PROFILE)")
    p.add_argument("--regime", default="supervised", choices=REGIMES,
                   help="supervised (default), contrastive (examples/contrastive.py) or all: one report section each")
    p.add_argument("--profile", default="default", choices=sorted(PROFILES),
                   help="default: the reduced study (15 minutes on two cores); faithful: the paper's regime "
                        "(memorised noisy labels, five pre-training seeds; hours)")
    p.add_argument("--tiny", action="store_true", help="seconds-scale run (tests)")
    p.add_argument("--full", action="store_true", help="run every ablation (%s)" % ", ".join(ABLATIONS))
    p.add_argument("--ablations", nargs="*", default=None, choices=ABLATIONS,
                   help="ablations to run (default: the profile's; --full: all)")
    p.add_argument("--ablation-gamma", type=noise_ratio, default=0.1, help="noise ratio of the ablations (0.1 = 10%%)")
    p.add_argument("--gammas", nargs="+", type=noise_ratio, default=None,
                   help="noise ratios as fractions (0.1 = 10%%; default: the profile's)")
    p.add_argument("--pretrain-seeds", nargs="+", type=seed_list, default=None,
                   help="pre-training seeds, one model per noise ratio each (default 0,1,2)")
    p.add_argument("--seeds", nargs="+", type=seed_list, default=None, help="tuning seeds (default: the profile's)")
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "imagenet", "imagefolder", "cifar10", "cifar100"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--arch", default=pt.GLYPH_ARCH, help="timm architecture (resnet50, vit_base_patch16_224, ...)")
    p.add_argument("--image-size", type=int, default=224, help="image size of the real-data transforms")
    p.add_argument("--task", action="append", default=[],
                   help="downstream task spec (see nmtune_study.data.vision.parse_task_spec); default: the offline tasks")
    p.add_argument("--pretrain-epochs", type=positive_int, default=None, help="default: the profile's")
    p.add_argument("--clip-epochs", type=positive_int, default=None,
                   help="CLIP pre-training epochs of the contrastive regime (default: the profile's)")
    p.add_argument("--protocols", nargs="+", default=None, choices=["selected", "paper"],
                   help="downstream protocols (default: both; claims are decided on the first)")
    p.add_argument("--pretrain-batch-size", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--fractions", nargs="+", type=float, default=None,
                   help="downstream data fractions of the main table (default 1.0; the fractions ablation "
                        "runs 0.1 0.25 0.5 0.75)")
    p.add_argument("--tune-epochs", type=int, default=30)
    p.add_argument("--lambdas", nargs="+", type=float, default=None,
                   help=f"lambda values of the lambda ablation (default {' '.join(map(str, LAMBDAS))})")
    p.add_argument("--tune-batch-size", type=int, default=128)
    p.add_argument("--loss-preset", default="paper")
    p.add_argument("--lora", action="store_true", help="add LoRA and LoRA+NMTune rows (slow on CPU)")
    p.add_argument("--language", action="store_true", help="also run examples/language.py (Table 2 analogue)")
    p.add_argument("--refresh-results", action="store_true",
                   help="copy report.md, claims.json, results.json, timing.json and figures/ into examples/results/ "
                        "(the committed results; never done by default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small eigen-solves of the tuning stage run slower with "
                        "more threads, and a shared machine oversubscribes; 0 keeps torch's default)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the (noise ratio, pre-training seed) cells (default: 2, or 1 on one core); "
                        "results do not depend on it")
    p.add_argument("--no-progress", action="store_true")
    return p


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    prof = PROFILES[a.profile]
    gammas = list(a.gammas) if a.gammas else list(prof["gammas"])
    ablations = list(ABLATIONS) if a.full else list(prof["ablations"] if a.ablations is None else a.ablations)
    clip = {} if a.tiny else dict(prof["clip"])
    if a.clip_epochs:
        clip["epochs"] = a.clip_epochs
    return dict(
        profile=a.profile,
        gammas=gammas,
        pretrain_seeds=flat(a.pretrain_seeds) or ([0, 1] if a.tiny else list(prof["pretrain_seeds"])),
        seeds=flat(a.seeds) or ([0, 1] if a.tiny else list(prof["seeds"])),
        pretrain_epochs=a.pretrain_epochs or (2 if a.tiny else prof["pretrain_epochs"]),
        pretrain_per_char=prof["pretrain_per_char"],
        pretrain_channels_last=prof["pretrain_channels_last"],
        fractions=a.fractions or [1.0],
        tune_epochs=3 if a.tiny and a.tune_epochs == 30 else a.tune_epochs,
        protocols=list(a.protocols or prof["protocols"]),
        ablations=ablations,
        ablation_gamma=a.ablation_gamma,
        lambdas=list(a.lambdas or LAMBDAS),
        clip=clip,
    )


def _profile_notes(s: dict[str, Any]) -> list[str]:
    """What this run changes from the faithful profile (nothing for a faithful run)."""
    faithful = dict(PROFILES["faithful"])
    diffs = [f"{k} {s[k]} (faithful: {v})" for k, v in faithful.items() if k in s and s[k] != v]
    if not diffs:
        return ["The faithful profile: the committed study."] if s.get("profile") == "faithful" else []
    return [f"Differs from the faithful profile (`--profile faithful`, the committed study) in: {'; '.join(diffs)}."]


def _load_tasks(a: argparse.Namespace, cache: pathlib.Path) -> list[vd.ImageTask]:
    if a.task:
        return [vd.parse_task_spec(s, image_size=a.image_size, download=a.download) for s in a.task]
    return cached(cache, lambda: vd.offline_tasks(tiny=a.tiny))




class _Clock:
    """Wall and CPU seconds per stage, summed over calls (``timing.json``)."""

    def __init__(self, path: pathlib.Path, log: Callable[[str], None]) -> None:
        self.path, self.log = path, log
        self.t = json.loads(path.read_text()) if path.exists() else {}
        self.t.setdefault("wall", {})
        self.t.setdefault("cpu", {})

    def stage(self, name: str, t0: float, c0: float) -> None:
        # Re-read first: several processes may work on one --out (e.g. one per noise ratio).
        if self.path.exists():
            self.t = json.loads(self.path.read_text())
        for key, now, start in (("wall", time.time(), t0), ("cpu", cpu_seconds(), c0)):
            self.t.setdefault(key, {})
            self.t[key][name] = self.t[key].get(name, 0.0) + now - start
        atomic_write_text(self.path, json.dumps(self.t, indent=1))


def _tuning(a: argparse.Namespace, s: dict[str, Any], **over: Any) -> ev.TuneSettings:
    base = dict(seeds=s["seeds"], fractions=s["fractions"], epochs=s["tune_epochs"], loss_config=a.loss_preset,
                batch_size=a.tune_batch_size, protocols=s["protocols"])
    return ev.TuneSettings(**(base | over))


def _pretrain_one(a, s, data, pdir: pathlib.Path, gamma: float, seed: int, log, **noise: Any) -> dict[str, Any]:
    cfg = pt.PretrainConfig(arch=a.arch, noise=gamma, epochs=s["pretrain_epochs"], seed=seed,
                            batch_size=16 if a.tiny else a.pretrain_batch_size, lr=a.pretrain_lr, workers=a.workers,
                            channels_last=s["pretrain_channels_last"], **noise)
    if (pdir / "model.pt").exists() and (pdir / "metrics.json").exists():
        done = json.loads((pdir / "metrics.json").read_text())
        # a config saved before a field existed compares with that field at its default
        saved = json.loads(json.dumps(dataclasses.asdict(pt.PretrainConfig(**done["config"]))))
        if saved != json.loads(json.dumps(dataclasses.asdict(cfg))):
            raise ValueError(f"{pdir} holds a model pre-trained with {done.get('config')}, not {cfg}; "
                             "use another --out (each profile has its own default) or delete the folder")
        return done
    t0 = time.time()
    m = pt.pretrain(data, pdir, cfg, progress=not a.no_progress)
    log(f"pretrain gamma={gamma:g} seed={seed}: val acc {m['val_accuracy']:.4f} ({time.time() - t0:.0f} s)")
    return m


def _cell(a, s, out: pathlib.Path, data, tasks, gamma: float, seed: int, log=None) -> tuple[Any, Any]:
    """Pre-train one model (noise ``gamma``, seed ``seed``) and evaluate it; both resumable."""
    if a.threads:  # a worker process starts with torch's default thread count
        torch.set_num_threads(a.threads)
    log = log or (lambda msg: None)
    sub = pathlib.Path(_tag(gamma)) / f"s{seed}"
    pre = _pretrain_one(a, s, data, out / "pretrain" / sub, gamma, seed, log)
    res = ev.run_evaluation(
        out / "pretrain" / sub / "model.pt", tasks, out / "eval" / sub, gamma=gamma, tuning=_tuning(a, s),
        lora=a.lora, feature_cache=out / "features" / sub, workers=a.workers, pretrain_seed=seed)
    return pre, res


def _run_cells(a, s, out: pathlib.Path, data, tasks, clock: _Clock, log) -> tuple[dict, dict]:
    """Every (noise ratio, pre-training seed) cell, in ``--jobs`` processes. Each cell is seeded on
    its own, so the results do not depend on the number of processes or their order."""
    pre: dict[float, dict[int, Any]] = {}
    evals: dict[float, dict[int, Any]] = {}
    cells = [(g, p) for g in s["gammas"] for p in s["pretrain_seeds"]]
    t0, c0 = time.time(), cpu_seconds()

    def done(cell: tuple[float, int], result: tuple[Any, Any]) -> None:
        (g, p), (pr, res) = cell, result
        pre.setdefault(g, {})[p], evals.setdefault(g, {})[p] = pr, res
        log(f"gamma={g:g} seed={p}: {len(res['records'])} records ({time.time() - t0:.0f} s)")

    # a cell run here reports its pre-training progress through ``log`` (a closure: it does not pickle)
    here = a.jobs <= 1 or len(cells) <= 1
    run_cells(functools.partial(_cell, a, s, out, data, tasks, log=log if here else None), cells, a.jobs, done)
    clock.stage("pretrain+evaluate", t0, c0)  # CPU time includes the worker processes
    return ({g: dict(sorted(pre[g].items())) for g in sorted(pre)},
            {g: dict(sorted(evals[g].items())) for g in sorted(evals)})


def _run_supervised(a, s, out: pathlib.Path, data, tasks, clock: _Clock, log) -> dict[str, Any]:
    pre, evals = _run_cells(a, s, out, data, tasks, clock, log)
    records = [r for g in sorted(evals) for p in sorted(evals[g]) for r in evals[g][p]["records"]]
    abl: list[dict[str, Any]] = []
    for name in s["ablations"]:
        t0, c0 = time.time(), cpu_seconds()
        abl += _ablation(name, a, s, out, data, tasks, records, log)
        clock.stage(f"ablation:{name}", t0, c0)
    width = pt.build_backbone(a.arch, data.num_classes, data.in_chans).num_features
    return {"regime": "supervised", "records": records, "ablation_records": abl, "feature_dim": width,
            "tune_batch_size": a.tune_batch_size,
            "backbone": {g: {p: e["backbone"] for p, e in by.items()} for g, by in evals.items()},
            "pretrain_accuracy": {g: {p: m["val_accuracy"] for p, m in by.items()} for g, by in pre.items()},
            "pretrain_memorised": {g: {p: m["memorised"] for p, m in by.items()} for g, by in pre.items() if g > 0},
            "pretrain_curves": {g: {p: [{k: h.get(k) for k in _CURVE_KEYS} for h in m["history"]]
                                    for p, m in by.items()} for g, by in pre.items()},
            "pretrain": pre, "spectra": {g: by[min(by)]["spectra"] for g, by in evals.items()}}


_CURVE_KEYS = ("epoch", "train_loss", "val_accuracy", "memorised", "flipped_clean", "unflipped_accuracy")


_TERM_VARIANTS = {
    "full (paper)": {},
    "-MSE": {"consistency_weight": 0.0},
    "-COV": {"covariance_weight": 0.0},
    "-SVD": {"singular_value_weight": 0.0},
    "MSE only": {"covariance_weight": 0.0, "singular_value_weight": 0.0},
    "COV only": {"consistency_weight": 0.0, "singular_value_weight": 0.0},
    "SVD only": {"consistency_weight": 0.0, "covariance_weight": 0.0},
}


def _ablation_plan(name: str, a, s) -> list[tuple[str, dict[str, Any]]]:
    """``(variant, TuneSettings overrides)``; ``None`` overrides = reuse the main records."""
    cfg = a.loss_preset
    if name == "terms":
        return [(v, {"methods": ("nmtune",), "loss_config": NMTuneConfig.from_preset(cfg, **o)} if o else None)
                for v, o in _TERM_VARIANTS.items()]
    if name == "top_k":  # all three rerun, on identical batches (see _safe_batch)
        return [(f"top_k={k}", {"methods": ("nmtune",), "loss_config": NMTuneConfig.from_preset(cfg, top_k=k)})
                for k in (1, 3, 5)]
    if name == "fractions":
        return [(f"{100 * f:g}% data", None if f in s["fractions"] else {"fractions": (f,)})
                for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
    if name == "label_noise":
        return [(f"eta={100 * e:g}%", None if e == 0 else {"label_noise": e}) for e in (0.0, 0.1, 0.3)]
    if name == "lambda":  # lambda = 0 first: the paired differences are against it (MLP tuning)
        paper = NMTuneConfig.from_preset(cfg).lambda_
        return [(f"lambda={lam:g}", None if lam == paper else
                 {"methods": ("nmtune",), "loss_config": NMTuneConfig.from_preset(cfg, lambda_=lam)})
                for lam in sorted(s["lambdas"])]
    raise ValueError(f"unknown ablation {name!r}; expected one of {ABLATIONS}")


def _safe_batch(n: int, batch_size: int, min_rows: int) -> int:
    """The largest batch size <= ``batch_size`` whose trailing batch of ``n`` rows is empty or
    has at least ``min_rows`` rows.

    ``fit`` merges a trailing batch too small for ``top_k`` into the previous one, and what is
    too small depends on ``top_k``; with this batch size no batch is merged, so the ``top_k``
    variants of the ablation see exactly the same batches and differ only in ``top_k``.

    Example:
        >>> _safe_batch(387, 128, 5), _safe_batch(256, 128, 5)
        (127, 128)
    """
    for b in range(batch_size, min_rows - 1, -1):
        if n % b == 0 or n % b >= min_rows:
            return b
    return n


def _ablation(name: str, a, s, out: pathlib.Path, data, tasks, main_records, log) -> list[dict[str, Any]]:
    """Records of one ablation at ``s["ablation_gamma"]`` on every pre-trained model (cached)."""
    g = min(s["gammas"], key=lambda x: abs(x - s["ablation_gamma"]))
    if name == "asymmetric":
        return _asymmetric(a, s, out, data, tasks, main_records, log)
    rows: list[dict[str, Any]] = []
    for variant, over in _ablation_plan(name, a, s):
        if over is None:  # the main run already holds this setting
            methods = {"terms": ("nmtune",), "top_k": ("nmtune",), "lambda": ("nmtune",)}.get(
                name, ("lp", "mlp", "nmtune"))
            keep = [r for r in main_records if r["gamma"] == g and r["method"] in methods
                    and r.get("protocol", "paper") == "paper" and (name != "label_noise" or r["kind"] == "id")]
            rows += [dict(r, ablation=name, variant=variant) for r in keep]
            continue
        for seed in s["pretrain_seeds"]:
            sub = pathlib.Path(_tag(g)) / f"s{seed}"
            tuning = _tuning(a, s, **(over | {"protocols": ("paper",)}))  # one knob moves: the paper's recipe
            cache = out / "ablations" / name / sub / (variant.replace("%", "pct").replace(" ", "_") + ".json")
            key = tuning.as_record()
            if cache.exists() and json.loads(cache.read_text())["settings"] == key:
                rows += json.loads(cache.read_text())["records"]
                continue
            recs = []
            for t in tasks:
                if name == "label_noise" and t.kind != "id":
                    continue
                feats = torch.load(out / "features" / sub / f"{t.name}.pt", weights_only=False)
                task_tuning = tuning
                if name == "top_k":
                    bs = _safe_batch(len(feats["train"][1]), tuning.batch_size, 5)
                    task_tuning = dataclasses.replace(tuning, batch_size=bs)
                recs += [dict(r, ablation=name, variant=variant)
                         for r in ev.tune_and_score(feats, gamma=g, settings=task_tuning, pretrain_seed=seed)]
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps({"settings": key, "records": recs}))
            rows += recs
        log(f"ablation {name}: {variant} done")
    return rows


def _asymmetric(a, s, out: pathlib.Path, data, tasks, main_records, log) -> list[dict[str, Any]]:
    """Pre-training noise only within the classes shared with a downstream task (the
    glyphs A-Z that the OOD font task uses), against symmetric noise of the same ratio."""
    if a.dataset != "glyphs" or a.task:
        log("ablation asymmetric: needs the offline glyph data and tasks; skipped")
        return []
    g = min((x for x in s["gammas"] if x > 0), key=lambda x: abs(x - max(s["ablation_gamma"], 0.2)))
    chars = vd.PRETRAIN_CHARS[:data.num_classes]
    overlap = tuple(i for i, c in enumerate(chars) if c in vd.OOD_CHARS)
    rows = [dict(r, ablation="asymmetric", variant=v) for r in main_records
            for v, gg in (("clean", 0.0), (f"symmetric {100 * g:g}%", g))
            if r["gamma"] == gg and r.get("protocol", "paper") == "paper"]
    variant = f"asymmetric {100 * g:g}%"
    for seed in s["pretrain_seeds"]:
        pdir = out / "ablations" / "asymmetric" / _tag(g) / f"s{seed}"
        _pretrain_one(a, s, data, pdir, g, seed, log, noise_type="asymmetric", noise_classes=overlap)
        res = ev.run_evaluation(pdir / "model.pt", tasks, pdir / "eval", gamma=g,
                                tuning=_tuning(a, s, protocols=("paper",)),
                                feature_cache=pdir / "features", pretrain_seed=seed)
        rows += [dict(r, ablation="asymmetric", variant=variant) for r in res["records"]]
    return rows


def _final_accuracy(curves: Any) -> float | None:
    """The last validation / zero-shot accuracy of a pre-training record (any layout)."""
    if isinstance(curves, (int, float)):
        return float(curves)
    if not isinstance(curves, dict):
        return None
    for key in ("val_accuracy", "zeroshot_val_accuracy", "zeroshot_accuracy", "val_acc", "accuracy"):
        v = curves.get(key)
        if isinstance(v, list) and v:
            v = v[-1]
        if isinstance(v, (int, float)):
            return float(v)
    return None


def _last(values: Any) -> float | None:
    """The last entry of a per-epoch list (``None`` when there is none)."""
    if isinstance(values, list):
        values = [v for v in values if v is not None]
        return float(values[-1]) if values else None
    return None if values is None else float(values)


def _by_gamma_seed(obj: Any, leaf: Callable[[Any], bool]) -> dict[float, dict[int, Any]]:
    """``{gamma: {pretrain_seed: x}}`` from ``{gamma: x}`` or ``{gamma: {seed: x}}`` (str keys too)."""
    out: dict[float, dict[int, Any]] = {}
    for g, v in (obj or {}).items():
        if leaf(v):
            out[float(g)] = {0: v}
        elif isinstance(v, dict):
            out[float(g)] = {int(p): x for p, x in v.items() if leaf(x)}
    return out


def _contrastive_pretrain(curves: Any) -> dict[float, dict[int, Any]]:
    """``{gamma: {pretrain_seed: record}}`` from ``run_regime``'s ``pretrain``: one curve per run, keyed
    by run tag, each naming its ``gamma`` and ``pretrain_seed`` with the per-epoch zero-shot accuracy on
    the clean validation split (``zeroshot_val``); other layouts go through ``_by_gamma_seed``."""
    runs = list((curves or {}).values())
    if runs and all(isinstance(c, dict) and {"gamma", "pretrain_seed"} <= set(c) for c in runs):
        out: dict[float, dict[int, Any]] = {}
        for c in runs:
            out.setdefault(float(c["gamma"]), {})[int(c["pretrain_seed"])] = {
                "zeroshot_accuracy": c.get("zeroshot_val"), "memorised": c.get("memorised")}
        return out
    return _by_gamma_seed(curves, lambda v: _final_accuracy(v) is not None)


def _contrastive_backbone(backbone: Any) -> dict[float, dict[int, Any]]:
    """``{gamma: {pretrain_seed: {"id_sve", "ood_lsvr", ...}}}``: per pre-training seed when
    ``run_regime`` gives ``per_pretrain_seed`` (so the trend claims get their interval), else the mean."""
    out: dict[float, dict[int, Any]] = {}
    for g, v in (backbone or {}).items():
        if isinstance(v, dict) and isinstance(v.get("per_pretrain_seed"), dict):
            out[float(g)] = {int(p): b for p, b in v["per_pretrain_seed"].items()}
    return out or _by_gamma_seed(backbone, lambda v: "id_sve" in v if isinstance(v, dict) else False)


def _run_contrastive(a, s, out: pathlib.Path, clock: _Clock, log) -> dict[str, Any]:
    t0, c0 = time.time(), cpu_seconds()
    res = contrastive.run_regime(out / "contrastive", tiny=a.tiny, gammas=tuple(s["gammas"]),
                                 pretrain_seeds=tuple(s["pretrain_seeds"]), tune_seeds=tuple(s["seeds"]),
                                 settings=_tuning(a, s), clip=s["clip"], jobs=a.jobs, threads=a.threads)
    clock.stage("contrastive", t0, c0)
    log(f"contrastive: {len(res['records'])} records ({time.time() - t0:.0f} s)")
    pre = _contrastive_pretrain(res.get("pretrain"))
    curves: dict[float, dict[int, list[dict[str, Any]]]] = {}
    for c in (res.get("pretrain") or {}).values():
        if isinstance(c, dict) and {"gamma", "pretrain_seed", "zeroshot_val"} <= set(c):
            mem = c.get("memorised") or [None] * len(c["zeroshot_val"])
            curves.setdefault(float(c["gamma"]), {})[int(c["pretrain_seed"])] = [
                {"epoch": i + 1, "val_accuracy": z, "memorised": m} for i, (z, m) in enumerate(zip(c["zeroshot_val"], mem))]
    return {"regime": "contrastive", "records": [dict(r, regime="contrastive") for r in res["records"]],
            "feature_dim": res.get("feature_dim"), "tune_batch_size": a.tune_batch_size, "chance": res.get("chance"),
            "ablation_records": [], "backbone": _contrastive_backbone(res.get("backbone")),
            "pretrain_accuracy": {g: {p: _final_accuracy(v) for p, v in by.items()} for g, by in pre.items()},
            "pretrain_memorised": {g: {p: _last(v.get("memorised")) for p, v in by.items()}
                                   for g, by in pre.items() if g > 0},
            "pretrain_curves": curves,
            "pretrain": res.get("pretrain"), "figures": [str(f) for f in res.get("figures", [])], "spectra": {}}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns the aggregated results."""
    a = parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = _settings(a)
    out = pathlib.Path(a.out or ("runs/reproduce" if a.profile == "default" else f"runs/reproduce-{a.profile}"))
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: None) if a.no_progress else (lambda msg: print(f"[reproduce] {msg}", flush=True))
    clock = _Clock(out / "timing.json", log)
    t_all, c_all = time.time(), cpu_seconds()
    regimes = ("supervised", "contrastive") if a.regime == "all" else (a.regime,)
    sections = []
    if "supervised" in regimes:
        t0, c0 = time.time(), cpu_seconds()
        per_char = s["pretrain_per_char"]
        data = pt.load_pretrain_data(a.dataset, a.data_root, image_size=a.image_size, tiny=a.tiny,
                                     download=a.download, per_char=per_char,
                                     cache=out / "data" / f"pretrain_pc{per_char}.pt" if a.dataset == "glyphs" else None)
        tasks = _load_tasks(a, out / "data" / "tasks.pt")
        clock.stage("data", t0, c0)
        log(f"data: {len(data.train)} pre-training images, {data.num_classes} classes; tasks "
            + ", ".join(f"{t.name} ({t.kind})" for t in tasks))
        sections.append(_run_supervised(a, s, out, data, tasks, clock, log))
    if "contrastive" in regimes:
        sections.append(_run_contrastive(a, s, out, clock, log))
    language = None
    if a.language:
        t0, c0 = time.time(), cpu_seconds()
        language = language_study.run_study(out / "language", tiny=a.tiny)
        clock.stage("language", t0, c0)
    t0, c0 = time.time(), cpu_seconds()
    command = " ".join(["python examples/reproduce_paper.py", *(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    report_settings = dict(s, profile_notes=_profile_notes(s), pretrain_rule=PRETRAIN_RULE if "supervised" in regimes else None)
    result = write_report(out, sections, report_settings, command=command, timing=clock.t,
                          language_table=(out / "language" / "table.md") if language is not None else None)
    clock.stage("report", t0, c0)
    log(f"report: {out / 'report.md'} ({time.time() - t_all:.0f} s wall, {cpu_seconds() - c_all:.0f} s CPU this call)")
    if a.refresh_results:
        refresh_results(out, committed_results())
        log(f"copied the report into {committed_results()}")
    return result


def refresh_results(out: pathlib.Path, dest: pathlib.Path) -> None:
    """Copy a run's report files into ``dest`` (the committed ``examples/results/``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "claims.json", "results.json", "timing.json"):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)
    for sub in ("figures", "contrastive/figures"):  # replaced whole: no figure of an older run stays behind
        if (out / sub).exists():
            shutil.rmtree(dest / sub, ignore_errors=True)
            shutil.copytree(out / sub, dest / sub)
    for name in ("contrastive/records.json", "contrastive/results.md"):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)


def main(argv: list[str] | None = None) -> int:
    """``python examples/reproduce_paper.py`` / ``python -m nmtune_study.reproduce``: :func:`run`, exit status 0."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
