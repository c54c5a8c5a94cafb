"""The contrastive (CLIP) regime end to end: noisy pairs, pre-training, downstream study.

For every noise ratio gamma (fraction of image-text pairs whose caption is swapped)
and pre-training seed, :func:`run_regime`

1. pre-trains the offline CLIP of ``pretrain_clip.py`` on the ``_clip_data`` pairs
   (checkpoint per epoch; per-epoch contrastive loss and zero-shot accuracy on the
   clean validation split);
2. extracts the frozen image tower's features (``encode_image``) on the supervised
   study's ID and OOD tasks (``_vision_data.offline_tasks``), cached per task;
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
import json
import math
import os
import pathlib
import resource
import sys
import time
from typing import Any, Callable, Sequence

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _clip_data as cd  # noqa: E402
import _vision_data as vd  # noqa: E402
import _report as rp  # noqa: E402
from _common import atomic_save, flat, mean_std, noise_ratio, seed_list  # noqa: E402
import evaluate as ev  # noqa: E402
import pretrain_clip as pc  # noqa: E402

from nmtune import evaluate, extract_features  # noqa: E402

__all__ = ["run_regime", "evaluate_checkpoint", "clip_task_features", "zeroshot_records", "task_classes",
           "results_markdown", "main"]

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
    if cache_file is not None and cache_file.exists():
        return torch.load(cache_file, weights_only=False)

    def run(ds):
        if isinstance(ds, vd.TensorImageDataset):
            return pc.encode_images(model, ds.images).float(), ds.labels.clone()
        loader = torch.utils.data.DataLoader(ds, batch_size=256)  # real data: _vision_data's transforms
        return extract_features(model, loader, forward=lambda m, x: m.encode_image(pc.to_clip_input(x)))

    out = {"train": run(task.train), "tests": {k: run(v) for k, v in task.tests.items()},
           "num_classes": task.num_classes, "kind": task.kind, "name": task.name}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(out, cache_file)
    return out


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
    tmp = res_file.with_name("results.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, res_file)
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
    if cache.exists():
        return torch.load(cache, weights_only=False)
    data = (cd.offline_pairs(tiny=tiny, per_font=per_font), cd.offline_val(tiny=tiny), vd.offline_tasks(tiny=tiny))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(data, cache)
    return data


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
    done: dict[tuple[float, int], tuple[dict, dict]] = {}
    if jobs > 1 and len(cells) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_cell, out, tiny, clip, g, s, settings, progress, threads): (g, s)
                       for g, s in cells}
            for fut in cf.as_completed(futures):
                done[futures[fut]] = fut.result()
    else:
        for g, s in cells:
            done[(g, s)] = _cell(out, tiny, clip, g, s, settings, progress, threads)
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
    (out / "results.md").write_text(results_markdown(records, backbone, curves, timing))
    result = {"records": records, "pretrain": curves, "backbone": backbone, "figures": figures, "timing": timing,
              "feature_dim": pc.MODEL_CONFIG["embed_dim"], "chance": 1 / len(val_chars(tiny))}
    (out / "records.json").write_text(json.dumps(
        {**result, "backbone": {str(g): b for g, b in backbone.items()}}, indent=1))
    return result


def _figures(fig_dir: pathlib.Path, records, backbone, curves) -> list[str]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = rp.summarize_records(records)  # std over every pre-trained x tuned model
    paths = [rp.plot_method_comparison(summary, fig_dir / "methods.png", methods=METHODS),
             rp.plot_spectral_metrics(backbone, fig_dir / "sve_lsvr.png"),
             _plot_noise_accuracy(summary, fig_dir / "noise_vs_accuracy.png"),
             _plot_curves(curves, fig_dir / "pretrain_curves.png")]
    return [str(p) for p in paths]


def _plot_noise_accuracy(summary, path: pathlib.Path) -> str:
    plt = rp.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("id", "ood")):
        for m in METHODS:
            gs = sorted(g for g in summary.get(m, {}) if kind in summary[m][g])
            if gs:
                ax.errorbar([100 * g for g in gs], [100 * summary[m][g][kind]["accuracy"][0] for g in gs],
                            yerr=[100 * summary[m][g][kind]["accuracy"][1] for g in gs], marker="o", capsize=3,
                            label="NMTune" if m == "nmtune" else m.upper() if m != "zeroshot" else "zero-shot")
        ax.set_xlabel("swapped image-text pairs (%)")
        ax.set_ylabel(f"avg {kind.upper()} accuracy (%)")
        ax.set_title(f"CLIP, {kind.upper()}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return rp.save_figure(fig, path)


def _plot_curves(curves, path: pathlib.Path) -> str:
    plt = rp.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    gammas = sorted({c["gamma"] for c in curves.values()})
    cmap = plt.get_cmap("viridis")
    for i, g in enumerate(gammas):
        runs = [c for c in curves.values() if c["gamma"] == g]
        for ax, key in zip(axes, ("loss", "zeroshot_val")):
            n = min(len(c[key]) for c in runs)
            mean = [sum(c[key][e] for c in runs) / len(runs) for e in range(n)]
            scale = 100 if key == "zeroshot_val" else 1
            ax.plot(range(1, n + 1), [scale * v for v in mean], marker="o", ms=3,
                    color=cmap(i / max(1, len(gammas) - 1)), label=f"{100 * g:g}%")
    axes[0].set_ylabel("contrastive loss (train, noisy pairs)")
    axes[1].set_ylabel("zero-shot accuracy, clean val (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="swapped")
    return rp.save_figure(fig, path)


def _mean_last(runs: Sequence[dict[str, Any]], key: str) -> str:
    """Mean over runs of the last value of a per-epoch curve (``-`` when a run has none)."""
    last = [c[key][-1] for c in runs if c.get(key) and c[key][-1] is not None]
    return f"{sum(last) / len(last):.3f}" if len(last) == len(runs) and not any(math.isnan(v) for v in last) else "-"


def results_markdown(records, backbone, curves, timing) -> str:
    """Tables: ID/OOD accuracy and macro-F1 by gamma and method (mean ± std over pre-training
    x tuning seeds), SVE/LSVR of the frozen features by gamma, pre-training summary."""
    import _diagnosis as DG

    protocols = DG.by_protocol(records)
    protocol = "selected" if "selected" in protocols else next(iter(protocols))
    summary = rp.summarize_records(protocols[protocol])  # std over every pre-trained x tuned model
    gammas = sorted({float(r["gamma"]) for r in records})
    lines = [f"## Downstream accuracy ({protocol} protocol; mean ± std over pre-training x tuning seeds; "
             "zero-shot: over pre-training seeds)", "", "| swapped | method | ID acc | ID F1 | OOD acc | OOD F1 |",
             "|---|---|---|---|---|---|"]
    for g in gammas:
        for m in METHODS:
            kinds = summary.get(m, {}).get(g)
            if not kinds:
                continue
            cells = []
            for kind in ("id", "ood"):
                for key in ("accuracy", "macro_f1"):
                    mu, sd = kinds.get(kind, {}).get(key, (math.nan, math.nan))
                    cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f}")
            lines.append(f"| {100 * g:g}% | {'NMTune' if m == 'nmtune' else m} | " + " | ".join(cells) + " |")
    lines += ["", "## Frozen image features (mean ± std over pre-training seeds)", "",
              "| swapped | ID SVE | OOD LSVR |", "|---|---|---|"]
    for g, b in sorted(backbone.items()):
        lines.append(f"| {100 * g:g}% | {b.get('id_sve', math.nan):.4f} ± {b.get('id_sve_std', math.nan):.4f} | "
                     f"{b.get('ood_lsvr', math.nan):.4f} ± {b.get('ood_lsvr_std', math.nan):.4f} |")
    lines += ["", "## Pre-training (mean over pre-training seeds, last epoch)", "",
              "| swapped | swapped pairs | naming another character | final loss | zero-shot val acc (clean) |"
              " memorised | cpu s per run |", "|---|---|---|---|---|---|---|"]
    for g in sorted({c["gamma"] for c in curves.values()}):
        runs = [c for c in curves.values() if c["gamma"] == g]
        mean = lambda f: sum(f(c) for c in runs) / len(runs)  # noqa: E731
        lines.append(f"| {100 * g:g}% | {runs[0]['num_swapped']}/{runs[0]['num_pairs']} | "
                     f"{mean(lambda c: c['swapped_other_character']):.0f} | {mean(lambda c: c['loss'][-1]):.4f} | "
                     f"{100 * mean(lambda c: c['zeroshot_val'][-1]):.2f} | {_mean_last(runs, 'memorised')} | "
                     f"{mean(lambda c: c['cpu_seconds']):.1f} |")
    lines += ["", "Timing (s, this call; stages already done are skipped): " +
              ", ".join(f"{k} {v:.0f}" for k, v in timing.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    a = p.parse_args(argv)
    a.pretrain_seeds, a.seeds = flat(a.pretrain_seeds), flat(a.seeds)
    if a.open_clip_checkpoint is not None:
        if a.model is None or a.gamma is None:
            raise ValueError("--open-clip-checkpoint needs --model and --gamma")
        res = evaluate_checkpoint(a.open_clip_checkpoint, a.model, a.out, gamma=a.gamma, tasks=vd.offline_tasks(
            tiny=a.tiny), settings=ev.TuneSettings(seeds=tuple(a.seeds), epochs=3 if a.tiny else 30))
        print(ev.results_markdown(res["records"]))
        return res
    gammas = tuple(a.gammas) if a.gammas else GAMMAS
    res = run_regime(pathlib.Path(a.out), tiny=a.tiny, gammas=gammas, pretrain_seeds=a.pretrain_seeds,
                     tune_seeds=a.seeds, progress=not a.no_progress)
    print((pathlib.Path(a.out) / "results.md").read_text())
    return res


if __name__ == "__main__":
    main()
