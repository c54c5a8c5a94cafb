"""The contrastive (CLIP) regime end to end: noisy pairs, pre-training, downstream study.

For every noise ratio gamma (fraction of image-text pairs whose caption is swapped)
and pre-training seed, :func:`run_regime`

1. pre-trains the offline CLIP of ``pretrain_clip.py`` on the ``data.clip`` pairs
   (checkpoint per epoch; per-epoch contrastive loss and zero-shot accuracy on the
   clean validation split);
2. extracts the frozen image tower's features (``encode_image``) on the supervised
   study's ID and OOD tasks (``data.vision.offline_tasks``), cached per task;
3. tunes LP, MLP and NMTune on them with ``evaluate.tune_and_score`` (the paper's
   recipes, the supervised study's tuning seeds) and adds a ``zeroshot`` row:
   classification by cosine similarity to class-name prompt embeddings;
4. measures SVE (ID) / LSVR (OOD) of the frozen features by gamma;

and writes ``records.json`` (records in the shared schema, ``regime="contrastive"``),
``results.md`` and figures under ``out_dir``. Finished stages are skipped on rerun.
Which of the paper's claims hold is decided by the study's statistics
(``reproduce_paper.py --regime contrastive``), not here.

Command line::

    python examples/contrastive.py --out runs/contrastive          # offline default
    python examples/contrastive.py --out /tmp/c --tiny             # seconds, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import resource
import time
from typing import Any, Callable, Sequence

import torch

from nmtune import evaluate, extract_features
from nmtune_study import evaluate as ev
from nmtune_study import pretrain_clip as pc
from nmtune_study.common import atomic_write_text, cached, flat, mean_std, noise_ratio, run_cells, seed_list
from nmtune_study.data import clip as cd
from nmtune_study.data import vision as vd
from nmtune_study.report import plots as P
from nmtune_study.report.markdown import contrastive_tables, model_table
from nmtune_study.report.records import summarize_records

__all__ = ["run_regime", "evaluate_checkpoint", "clip_task_features", "zeroshot_records", "task_classes", "main",
           "parser", "run"]

GAMMAS = (0.0, 0.05, 0.10, 0.20, 0.30)
_CLASS_NAMES = {"digits": "0123456789", "rotated-digits": "0123456789", "heldout-glyphs": vd.HELDOUT_CHARS,
                "font-domains": vd.OOD_CHARS}
METHODS = ("lp", "mlp", "nmtune", "zeroshot")


def _tag(gamma: float, seed: int) -> str:
    return f"g{round(100 * gamma):02d}_s{seed}"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def task_classes(task: vd.ImageTask) -> str:
    """The characters naming a task's classes, in label order (for zero-shot prompts).

    Example:
        >>> task_classes(vd.ImageTask("digits", "id", None, {}, 10))
        '0123456789'
    """
    if task.name not in _CLASS_NAMES:
        raise ValueError(f"no class names known for task {task.name!r}; expected one of {sorted(_CLASS_NAMES)}")
    return _CLASS_NAMES[task.name]


def clip_task_features(model: torch.nn.Module, task: vd.ImageTask, cache_file: pathlib.Path | None) -> dict[str, Any]:
    """Frozen image-tower features of ``task``'s train set and test sets, in
    ``evaluate.task_features``' layout (cached in ``cache_file``)."""

    def run(ds):
        if isinstance(ds, vd.TensorImageDataset):
            return pc.encode_images(model, ds.images).float(), ds.labels.clone()
        loader = torch.utils.data.DataLoader(ds, batch_size=256)  # real data: data.vision's transforms
        return extract_features(model, loader, forward=lambda m, x: m.encode_image(pc.to_clip_input(x)))

    return cached(cache_file, lambda: {"train": run(task.train), "tests": {k: run(v) for k, v in task.tests.items()},
                                       "num_classes": task.num_classes, "kind": task.kind, "name": task.name})


class _ZeroShotHead(torch.nn.Module):
    """``features -> (cosine logits to the class embeddings, normalised features)``."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(weights, requires_grad=False)

    def forward(self, x: torch.Tensor):
        z = torch.nn.functional.normalize(x, dim=-1)
        return z @ self.weights.T, z


def zeroshot_records(model: torch.nn.Module, feats: dict[str, Any], classes: str, *, gamma: float) -> list[dict]:
    """One ``zeroshot`` record per test set: class-name prompts, no tuning (``seed`` 0)."""
    head = _ZeroShotHead(pc.zero_shot_weights(model, pc.get_tokenizer(context_length=model.context_length),
                                                      cd.class_prompts(classes)))
    out = []
    for dom, (xt, yt) in feats["tests"].items():
        m = evaluate(head, xt, yt, normalize_rows=True)
        out.append(dict(gamma=gamma, method="zeroshot", kind=feats["kind"], task=feats["name"], domain=dom, seed=0,
                        fraction=1.0, **{k: m[k] for k in ("accuracy", "macro_f1", "sve", "lsvr")}))
    return out


def _evaluate_backbone(load: Callable[[], torch.nn.Module], tasks: Sequence[vd.ImageTask], out: pathlib.Path, *,
                       gamma: float, pretrain_seed: int, settings: ev.TuneSettings) -> dict[str, Any]:
    """LP/MLP/NMTune + zero-shot records and backbone SVE/LSVR of one pre-trained CLIP
    (``out/results.json``, skipped when it holds the same settings)."""
    key = dict(gamma=gamma, pretrain_seed=pretrain_seed, **settings.as_record(), tasks=[t.name for t in tasks])
    res_file = out / "results.json"
    if res_file.exists():
        prev = json.loads(res_file.read_text())
        if prev.get("settings") == key:
            return prev
    t0, c0 = time.time(), _cpu()
    model = load()
    feats = [clip_task_features(model, t, out / "features" / f"{t.name}.pt") for t in tasks]
    records = []
    for t, f in zip(tasks, feats):
        records += ev.tune_and_score(f, gamma=gamma, settings=settings)
        if t.name in _CLASS_NAMES:  # real-data tasks: no class names known here
            records += zeroshot_records(model, f, task_classes(t), gamma=gamma)
    for r in records:
        r.update(pretrain_seed=pretrain_seed, regime="contrastive")
    bm = ev.backbone_metrics(feats)
    result = {"settings": key, "records": records, "backbone": bm,
              "seconds": time.time() - t0, "cpu_seconds": _cpu() - c0}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(res_file, json.dumps(result, indent=1))
    return result


def _backbone_by_gamma(evals: dict[tuple[float, int], dict[str, Any]], records: Sequence[dict]) -> dict:
    """Per gamma: ``id_sve`` / ``ood_lsvr`` (mean over pre-training seeds, ``*_std`` their
    std), ``per_test_set`` (means), ``per_pretrain_seed`` and LP points for the scatter."""
    out: dict[float, dict[str, Any]] = {}
    for g in sorted({g for g, _ in evals}):
        per = {s: e["backbone"] for (gg, s), e in sorted(evals.items()) if gg == g}
        entry: dict[str, Any] = {"per_pretrain_seed": {str(s): {k: v for k, v in b.items() if k != "per_test_set"}
                                                        for s, b in per.items()}}
        for key in ("id_sve", "ood_lsvr"):
            vals = [b[key] for b in per.values() if key in b]
            if vals:
                entry[key], entry[f"{key}_std"] = mean_std(vals)
        names = next(iter(per.values()))["per_test_set"]
        entry["per_test_set"] = {n: {m: sum(b["per_test_set"][n][m] for b in per.values()) / len(per)
                                     for m in names[n]} for n in names}
        for kind, metric in (("id", "sve"), ("ood", "lsvr")):
            pts = []
            for n, vals in entry["per_test_set"].items():
                task, dom = n.split("/", 1)
                accs = [r["accuracy"] for r in records if r["method"] == "lp" and r["gamma"] == g
                        and r["task"] == task and r["domain"] == dom and r["kind"] == kind]
                if accs:
                    pts.append((vals[metric], sum(accs) / len(accs)))
            entry[f"{kind}_points"] = pts
        out[g] = entry
    return out


def evaluate_checkpoint(checkpoint: str | os.PathLike, model: str, out_dir: str | os.PathLike, *, gamma: float,
                        tasks: Sequence[vd.ImageTask] | None = None, pretrain_seed: int = 0,
                        settings: ev.TuneSettings = ev.TuneSettings()) -> dict[str, Any]:
    """Evaluate an ``open_clip_train`` checkpoint (paper-scale path) like the offline models:
    LP/MLP/NMTune (+ zero-shot on the offline tasks) on its frozen image features.

    Args:
        checkpoint: ``logs/NAME/checkpoints/epoch_K.pt``.
        model: what was passed to ``--model`` (``local-dir:FOLDER`` or a registered name).
        out_dir: where ``results.json`` and the feature cache go.
        gamma: the swap ratio the checkpoint was pre-trained with.
        tasks: downstream tasks (default: the offline ones; their 32x32 grey images are
            fed as they are, so the model's image size must be 32 for them).
        pretrain_seed: recorded in the records.
        settings: what is tuned.

    Returns:
        ``{"records", "backbone", ...}`` of :func:`_evaluate_backbone`.

    Example:
        >>> evaluate_checkpoint("runs/clip-logs/cc12m_g10/checkpoints/epoch_32.pt",
        ...                     "local-dir:runs/clip-config", "runs/eval/g10", gamma=0.1)  # doctest: +SKIP
    """
    tasks = list(tasks) if tasks is not None else vd.offline_tasks()
    return _evaluate_backbone(lambda: pc.load_open_clip_checkpoint(checkpoint, model), tasks,
                              pathlib.Path(out_dir), gamma=gamma, pretrain_seed=pretrain_seed, settings=settings)


def _data(out: pathlib.Path, tiny: bool, per_font: int | None = None
          ) -> tuple[cd.ClipPairs, tuple, list[vd.ImageTask]]:
    name = "data_tiny" if tiny else "data"
    cache = out / "data" / (f"{name}.pt" if per_font is None else f"{name}_pf{per_font}.pt")
    return cached(cache, lambda: (cd.offline_pairs(tiny=tiny, per_font=per_font), cd.offline_val(tiny=tiny),
                                  vd.offline_tasks(tiny=tiny)))


def val_chars(tiny: bool) -> str:
    """The classes of the zero-shot validation split."""
    return cd._sizes(tiny, None)[0]


def _pretrain_one(out: pathlib.Path, pairs, val, g: float, s: int, cfg: pc.ClipPretrainConfig,
                  progress: bool) -> dict[str, Any]:
    run = out / "pretrain" / _tag(g, s)
    metrics_file = run / "metrics.json"
    m = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    if m is None or not m["finished"] or m["config"] != dataclasses.asdict(cfg):
        m = pc.pretrain_clip(pairs, val, run, cfg, progress=progress)
    return {"gamma": g, "pretrain_seed": s, "loss": [h["loss"] for h in m["history"]],
            "zeroshot_val": [h["zeroshot_val"] for h in m["history"]],
            **{k: [h.get(k) for h in m["history"]] for k in ("memorised", "flipped_clean", "unflipped_accuracy")},
            "num_swapped": m["num_swapped"], "num_pairs": m["num_pairs"],
            "swapped_other_character": m["swapped_other_character"],
            "seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"]}


def _clip_config(g: float, s: int, tiny: bool, clip: dict[str, Any]) -> pc.ClipPretrainConfig:
    base = {"epochs": 2, "batch_size": 16} if tiny else {}
    return pc.ClipPretrainConfig(gamma=g, seed=s, **(base | {k: v for k, v in clip.items() if k != "per_font"}))


def _cell(out: pathlib.Path, tiny: bool, clip: dict[str, Any], g: float, s: int, settings: ev.TuneSettings,
          progress: bool, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pre-train and evaluate one CLIP (noise ``g``, seed ``s``); both stages resumable."""
    if threads:
        torch.set_num_threads(threads)
    pairs, val, tasks = _data(out, tiny, clip.get("per_font"))
    curve = _pretrain_one(out, pairs, val, g, s, _clip_config(g, s, tiny, clip), progress)
    path = out / "pretrain" / _tag(g, s) / "model.pt"
    ev_ = _evaluate_backbone(lambda: pc.load_clip(path), tasks, out / "eval" / _tag(g, s), gamma=g,
                             pretrain_seed=s, settings=settings)
    if progress:
        print(f"[contrastive] evaluated {_tag(g, s)}", flush=True)
    return curve, ev_


def run_regime(
    out_dir: pathlib.Path,
    *,
    tiny: bool = False,
    gammas: Sequence[float] = GAMMAS,
    pretrain_seeds: Sequence[int] = (0, 1, 2),
    tune_seeds: Sequence[int] = (0, 1, 2),
    settings: ev.TuneSettings | None = None,
    progress: bool = False,
    clip: dict[str, Any] | None = None,
    jobs: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """The contrastive regime (see the module docstring); resumable.

    Args:
        out_dir: output folder (``pretrain/``, ``eval/``, ``figures/``, ``records.json``,
            ``results.md``).
        tiny: seconds-scale sizes for tests.
        gammas: fractions of swapped pairs.
        pretrain_seeds: one CLIP per gamma and seed (seeds the model, batches, swap).
        tune_seeds: tuning seeds when ``settings`` is None.
        settings: what is tuned on the frozen features (default: the paper's recipes,
            ``tune_seeds``, full data; 3 tuning epochs when ``tiny``).
        progress: print a line per pre-training epoch and per evaluated backbone.
        clip: overrides of :class:`pretrain_clip.ClipPretrainConfig` (``epochs``,
            ``batch_size``, ``lr``...) and ``per_font`` (renderings per character and font).
        jobs: processes for the (gamma, seed) cells (results do not depend on it).
        threads: torch threads in each cell (0: torch's default).

    Returns:
        ``{"records", "pretrain", "backbone", "figures", "timing"}``: records in the shared
        schema (``regime="contrastive"``, ``pretrain_seed``; methods lp, mlp, nmtune,
        zeroshot); ``pretrain[tag]`` the per-epoch curves; ``backbone[gamma]`` SVE/LSVR.

    Example:
        >>> res = run_regime(pathlib.Path("/tmp/contrastive"), tiny=True)  # doctest: +SKIP
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings is None:
        settings = ev.TuneSettings(seeds=tuple(tune_seeds), epochs=3 if tiny else 30)
    clip = dict(clip or {})
    t0, c0 = time.time(), _cpu()
    _data(out, tiny, clip.get("per_font"))  # rendered once, before the cells read the cache
    t_data, c_data = time.time() - t0, _cpu() - c0
    cells = [(g, s) for g in gammas for s in pretrain_seeds]
    done = run_cells(functools.partial(_cell, out, tiny, clip, settings=settings, progress=progress,
                                       threads=threads), cells, jobs)
    curves = {_tag(g, s): done[(g, s)][0] for g, s in cells}
    evals = {(g, s): done[(g, s)][1] for g, s in cells}
    records = [r for e in evals.values() for r in e["records"]]
    backbone = _backbone_by_gamma(evals, records)
    # pre-training and evaluation overlap across the cells' processes: their own seconds are recorded
    timing = {"data_seconds": t_data, "cells_seconds": time.time() - t0 - t_data,
              "cpu_seconds_this_call": _cpu() - c0,
              "pretrain_cpu_seconds_recorded": sum(c["cpu_seconds"] for c in curves.values()),
              "evaluate_cpu_seconds_recorded": sum(e["cpu_seconds"] for e in evals.values())}
    figures = _figures(out / "figures", records, backbone, curves)
    (out / "results.md").write_text(contrastive_tables(records, backbone, curves, timing, methods=METHODS))
    result = {"records": records, "pretrain": curves, "backbone": backbone, "figures": figures, "timing": timing,
              "feature_dim": pc.MODEL_CONFIG["embed_dim"], "chance": 1 / len(val_chars(tiny))}
    (out / "records.json").write_text(json.dumps(
        {**result, "backbone": {str(g): b for g, b in backbone.items()}}, indent=1))
    return result


def _figures(fig_dir: pathlib.Path, records, backbone, curves) -> list[str]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_records(records)  # std over every pre-trained x tuned model
    paths = [P.plot_method_comparison(summary, fig_dir / "methods.png", methods=METHODS),
             P.plot_spectral_metrics(backbone, fig_dir / "sve_lsvr.png"),
             P.plot_clip_noise_accuracy(summary, fig_dir / "noise_vs_accuracy.png", METHODS),
             P.plot_clip_curves(curves, fig_dir / "pretrain_curves.png")]
    return [str(p) for p in paths]



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/contrastive")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--gammas", nargs="+", type=noise_ratio, default=None,
                   help="swap ratios as fractions (0.1 = 10%%; default 0 0.05 0.1 0.2 0.3)")
    p.add_argument("--pretrain-seeds", nargs="+", type=seed_list, default=[[0, 1, 2]])
    p.add_argument("--seeds", "--tune-seeds", dest="seeds", nargs="+", type=seed_list, default=[[0, 1, 2]],
                   help="tuning seeds (--tune-seeds is the old name)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--open-clip-checkpoint", default=None,
                   help="evaluate this open_clip_train checkpoint instead (needs --model and --gamma)")
    p.add_argument("--model", default=None, help="--model given to open_clip_train (e.g. local-dir:FOLDER)")
    p.add_argument("--gamma", type=noise_ratio, default=None, help="swap ratio of --open-clip-checkpoint (0.1 = 10%%)")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    a.pretrain_seeds, a.seeds = flat(a.pretrain_seeds), flat(a.seeds)
    if a.open_clip_checkpoint is not None:
        if a.model is None or a.gamma is None:
            raise ValueError("--open-clip-checkpoint needs --model and --gamma")
        return evaluate_checkpoint(a.open_clip_checkpoint, a.model, a.out, gamma=a.gamma, tasks=vd.offline_tasks(
            tiny=a.tiny), settings=ev.TuneSettings(seeds=tuple(a.seeds), epochs=3 if a.tiny else 30))
    gammas = tuple(a.gammas) if a.gammas else GAMMAS
    return run_regime(pathlib.Path(a.out), tiny=a.tiny, gammas=gammas, pretrain_seeds=a.pretrain_seeds,
                      tune_seeds=a.seeds, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    """``python examples/contrastive.py``, ``python -m nmtune_study.contrastive``: :func:`run`, then print
    its tables; exit status 0."""
    res = run(argv)
    if "pretrain" in res:  # the regime: results.md
        print(contrastive_tables(res["records"], res["backbone"], res["pretrain"], res["timing"], methods=METHODS))
    else:  # one open_clip_train checkpoint
        print(model_table(res["records"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
