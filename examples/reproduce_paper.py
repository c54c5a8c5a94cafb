"""The paper's study end to end: noisy pre-training, ID/OOD evaluation, report.

One command runs, for every noise ratio gamma in {0, 5, 10, 20, 30} %:

1. supervised pre-training with symmetric label noise gamma (``pretrain.py``);
2. frozen-feature extraction on the ID and OOD tasks (cached per gamma and task);
3. LP, MLP tuning and NMTune for several seeds and downstream data fractions
   (``evaluate.py``);

then writes ``report.md`` with the analogues of the paper's Figure 2 (ID/OOD
accuracy vs gamma), Figure 3 (SVE/LSVR vs gamma), Figure 5 (LP vs MLP vs NMTune F1
and spectra) and Table 1, and a table stating for each of the paper's claims
whether this run reproduced it (decided from the numbers). Finished stages are
skipped on rerun (checkpoints, cached features, per-gamma results).

Offline default (no downloads; about 10 minutes on 2 idle CPU cores)::

    python examples/reproduce_paper.py                 # -> runs/reproduce/report.md
    python examples/reproduce_paper.py --tiny --out /tmp/t   # seconds, for tests
    python examples/reproduce_paper.py --language      # + the language study (Table 2)

Paper scale (ImageNet-1K pre-training of ResNet-50, real downstream datasets)::

    python examples/reproduce_paper.py --dataset imagenet --data-root /data/imagenet \\
        --arch resnet50 --pretrain-epochs 90 --pretrain-batch-size 256 --image-size 224 \\
        --task cifar10:/data/cifar --task cifar100:/data/cifar --task folder:/data/dtd \\
        --task domains:/data/domainnet:real --task domains:/data/domainnet:sketch \\
        --fractions 0.1 0.25 0.5 0.75 1.0 --tune-batch-size 256 --out runs/paper
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _vision_data as vd  # noqa: E402
import evaluate as ev  # noqa: E402
import pretrain as pt  # noqa: E402

from nmtune import analysis  # noqa: E402

__all__ = ["main", "run", "write_report"]

GAMMAS = (0.0, 0.05, 0.10, 0.20, 0.30)


def _tag(gamma: float) -> str:
    return f"g{round(100 * gamma):02d}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--tiny", action="store_true", help="seconds-scale run (tests)")
    p.add_argument("--gammas", nargs="+", type=float, default=None, help="noise ratios in %% (default 0 5 10 20 30)")
    p.add_argument("--dataset", default="glyphs", choices=["glyphs", "imagenet", "imagefolder", "cifar10", "cifar100"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    p.add_argument("--arch", default=pt.GLYPH_ARCH, help="timm architecture (resnet50, vit_base_patch16_224, ...)")
    p.add_argument("--image-size", type=int, default=224, help="image size of the real-data transforms")
    p.add_argument("--task", action="append", default=[],
                   help="downstream task spec (see _vision_data.parse_task_spec); default: the offline tasks")
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--pretrain-batch-size", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--fractions", nargs="+", type=float, default=None)
    p.add_argument("--tune-epochs", type=int, default=30)
    p.add_argument("--tune-batch-size", type=int, default=128)
    p.add_argument("--loss-preset", default="paper")
    p.add_argument("--lora", action="store_true", help="add LoRA and LoRA+NMTune rows (slow on CPU)")
    p.add_argument("--language", action="store_true", help="also run examples/language.py (Table 2 analogue)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the small eigen-solves of the tuning stage run slower with "
                        "more threads, and a shared machine oversubscribes; 0 keeps torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    gammas = [g / 100 for g in a.gammas] if a.gammas else list(GAMMAS)
    return dict(
        gammas=gammas,
        pretrain_epochs=a.pretrain_epochs or (2 if a.tiny else 10),
        seeds=a.seeds or ([0, 1] if a.tiny else [0, 1, 2]),
        fractions=a.fractions or ([0.5, 1.0] if a.tiny else [0.25, 1.0]),
        tune_epochs=3 if a.tiny and a.tune_epochs == 30 else a.tune_epochs,
    )


def _load_tasks(a: argparse.Namespace, cache: pathlib.Path) -> list[vd.ImageTask]:
    if a.task:
        return [vd.parse_task_spec(s, image_size=a.image_size, download=a.download) for s in a.task]
    if cache.exists():
        return torch.load(cache, weights_only=False)
    tasks = vd.offline_tasks(tiny=a.tiny)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(tasks, cache)
    return tasks


def _load_language(out: pathlib.Path, tiny: bool) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("nmtune_examples_language", HERE / "language.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{HERE / 'language.py'} not found")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.run_study(out, tiny=tiny)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the study; returns the aggregated results."""
    a = _parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = _settings(a)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    timing_file = out / "timing.json"
    timing: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    t_all = time.time()
    log = (lambda msg: None) if a.no_progress else (lambda msg: print(f"[reproduce] {msg}", flush=True))

    def stage(name: str, t0: float) -> None:
        timing[name] = timing.get(name, 0.0) + time.time() - t0
        timing_file.write_text(json.dumps(timing, indent=1))

    t0 = time.time()
    data = pt.load_pretrain_data(a.dataset, a.data_root, image_size=a.image_size, tiny=a.tiny, download=a.download,
                                 cache=out / "data" / "pretrain.pt" if a.dataset == "glyphs" else None)
    tasks = _load_tasks(a, out / "data" / "tasks.pt")
    stage("data", t0)
    log(f"data: {len(data.train)} pre-training images, {data.num_classes} classes; tasks "
        + ", ".join(f"{t.name} ({t.kind})" for t in tasks))

    pre: dict[float, dict[str, Any]] = {}
    evals: dict[float, dict[str, Any]] = {}
    for gamma in s["gammas"]:
        pdir = out / "pretrain" / _tag(gamma)
        t0 = time.time()
        if (pdir / "model.pt").exists() and (pdir / "metrics.json").exists():
            pre[gamma] = json.loads((pdir / "metrics.json").read_text())
            log(f"pretrain gamma={gamma:g}: done before (val acc {pre[gamma]['val_accuracy']:.4f})")
        else:
            cfg = pt.PretrainConfig(arch=a.arch, noise=gamma, epochs=s["pretrain_epochs"],
                                    batch_size=16 if a.tiny else a.pretrain_batch_size, lr=a.pretrain_lr, workers=a.workers)
            pre[gamma] = pt.pretrain(data, pdir, cfg, progress=not a.no_progress)
            log(f"pretrain gamma={gamma:g}: val acc {pre[gamma]['val_accuracy']:.4f} "
                f"({time.time() - t0:.0f} s)")
        stage("pretrain", t0)
        t0 = time.time()
        tuning = ev.TuneSettings(seeds=s["seeds"], fractions=s["fractions"], epochs=s["tune_epochs"],
                                 loss_config=a.loss_preset, batch_size=a.tune_batch_size)
        evals[gamma] = ev.run_evaluation(
            pdir / "model.pt", tasks, out / "eval" / _tag(gamma), gamma=gamma, tuning=tuning, lora=a.lora,
            feature_cache=out / "features" / _tag(gamma), workers=a.workers)
        stage("evaluate", t0)
        log(f"evaluate gamma={gamma:g}: {len(evals[gamma]['records'])} records ({time.time() - t0:.0f} s)")

    language = None
    if a.language:
        t0 = time.time()
        language = _load_language(out / "language", a.tiny)
        stage("language", t0)
    t0 = time.time()
    command = " ".join(["python examples/reproduce_paper.py", *(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))])
    result = write_report(out, pre, evals, s, command=command, timing=timing,
        language_table=(out / "language" / "table.md") if language is not None else None)
    stage("report", t0)
    log(f"report: {out / 'report.md'} ({time.time() - t_all:.0f} s this call)")
    return result


def _machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), "
            + (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"))


def write_report(out: pathlib.Path, pre: dict[float, dict[str, Any]], evals: dict[float, dict[str, Any]],
                 settings: dict[str, Any], *, command: str, timing: dict[str, float],
                 language_table: pathlib.Path | None = None) -> dict[str, Any]:
    """Figures, claims and ``report.md`` from the per-gamma results."""
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    records = [r for g in sorted(evals) for r in evals[g]["records"]]
    fractions = sorted({float(r["fraction"]) for r in records})
    full = max(fractions)
    by_frac = {f: analysis.summarize_records(records, fraction=f) for f in fractions}
    summary = by_frac[full]
    backbone = {g: evals[g]["backbone"] for g in sorted(evals)}
    pre_acc = {g: pre[g]["val_accuracy"] for g in sorted(pre)}
    claims = analysis.check_claims(summary, backbone=backbone, pretrain_accuracy=pre_acc)

    figs = {
        "fig2": analysis.plot_noise_curves(by_frac, fig_dir / "fig2_noise_vs_accuracy.png"),
        "fig3": analysis.plot_spectral_metrics(backbone, fig_dir / "fig3_sve_lsvr.png"),
        "fig5": analysis.plot_method_comparison(summary, fig_dir / "fig5_methods.png"),
    }
    first_id = next((t for t in evals[min(evals)]["spectra"]
                     if any(r["task"] == t and r["kind"] == "id" for r in records)), None)
    if first_id is not None:
        figs["spectra_noise"] = analysis.plot_spectra(
            {f"{100 * g:g}% noise": evals[g]["spectra"][first_id]["backbone"] for g in sorted(evals)},
            fig_dir / "spectra_backbone.png", title=f"pre-trained features, {first_id} test")
        g0 = min(evals)
        figs["spectra_methods"] = analysis.plot_spectra(
            {("LP (Z = F, frozen features)" if m == "lp" else "NMTune" if m == "nmtune" else m.upper()): v
             for m, v in evals[g0]["spectra"][first_id].items() if m != "backbone"},
            fig_dir / "spectra_methods.png", title=f"tuned features Z, {first_id} test, {100 * g0:g}% noise")

    def cell(g, m, kind, key):
        mu, sd = summary.get(m, {}).get(g, {}).get(kind, {}).get(key, (float("nan"), float("nan")))
        return f"{100 * mu:.2f} ± {100 * sd:.2f}"

    methods = [m for m in ("lp", "mlp", "nmtune", "lora", "lora+nmtune") if m in summary]
    t1 = ["| noise | method | ID acc | ID F1 | OOD acc | OOD F1 |", "|---|---|---|---|---|---|"]
    for g in sorted(evals):
        for m in methods:
            t1.append(f"| {100 * g:g}% | {m.upper() if m != 'nmtune' else 'NMTune'} | {cell(g, m, 'id', 'accuracy')} | "
                      f"{cell(g, m, 'id', 'macro_f1')} | {cell(g, m, 'ood', 'accuracy')} | {cell(g, m, 'ood', 'macro_f1')} |")
    pre_rows = ["| noise | val acc (clean labels) | train acc (noisy labels) | noisy labels |", "|---|---|---|---|"]
    for g in sorted(pre):
        p = pre[g]
        pre_rows.append(f"| {100 * g:g}% | {100 * p['val_accuracy']:.2f} | {100 * p['train_noisy_accuracy']:.2f} | "
                        f"{p['num_noisy']}/{p['num_train']} |")
    fig3_rows = ["| noise | SVE (ID, frozen) | LSVR (OOD, frozen) |", "|---|---|---|"]
    for g, b in backbone.items():
        fig3_rows.append(f"| {100 * g:g}% | {b.get('id_sve', float('nan')):.4f} | {b.get('ood_lsvr', float('nan')):.4f} |")
    n_yes = sum(c["reproduced"] for c in claims)
    tasks_line = ", ".join(sorted({f"{r['task']} ({r['kind']})" for r in records}))
    wall = sum(timing.values())
    lines = [
        "# NMTune study: noisy pre-training, ID/OOD evaluation",
        "",
        f"- command: `{command}`",
        f"- machine: {_machine()}",
        "- wall time (s) by stage, summed over calls: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())
        + f"; total {wall:.0f}",
        f"- noise ratios: {', '.join(f'{100 * g:g}%' for g in sorted(evals))}; tuning seeds {settings['seeds']}; "
        f"downstream data fractions {settings['fractions']}; pre-training epochs {settings['pretrain_epochs']}; "
        f"tuning epochs {settings['tune_epochs']}",
        f"- downstream tasks: {tasks_line}",
        "",
        f"**{n_yes} of {len(claims)} checked claims reproduced in this run.** Each line below is decided by code "
        "from the numbers in `results.json`; 'within noise' means the deciding difference is smaller than the "
        "standard deviation over tuning seeds (the pre-training itself is one seed per noise ratio).",
        "",
        "## Claims",
        "",
        analysis.claims_markdown(claims),
        "",
        "## Pre-training (one model per noise ratio)",
        "",
        *pre_rows,
        "",
        f"## Table 1 analogue (mean ± std over seeds, {100 * full:g}% of the downstream data)",
        "",
        *t1,
        "",
        "## Figure 2 analogue: LP accuracy vs pre-training noise",
        "",
        "![fig2](figures/fig2_noise_vs_accuracy.png)",
        "",
        "## Figure 3 analogue: SVE (ID) and LSVR (OOD) of the frozen pre-trained features",
        "",
        *fig3_rows,
        "",
        "![fig3](figures/fig3_sve_lsvr.png)",
        "",
        "## Figure 5 analogue: LP vs MLP vs NMTune",
        "",
        "![fig5](figures/fig5_methods.png)",
        "",
    ]
    if "spectra_noise" in figs:
        lines += ["Singular value spectra (rows L2-normalised):", "",
                  "![spectra](figures/spectra_backbone.png) ![spectra](figures/spectra_methods.png)", ""]
    if language_table is not None and pathlib.Path(language_table).exists():
        lang = [("##" + ln if ln.startswith("#") else ln)  # nest its headings under this section
                for ln in pathlib.Path(language_table).read_text().splitlines()]
        lines += ["## Table 2 analogue: language (`examples/language.py`)", "", *lang, ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    result = {"settings": settings, "pretrain": {str(g): {k: v for k, v in p.items() if k != "history"}
                                                 for g, p in pre.items()},
              "summary": {m: {str(g): v for g, v in by_g.items()} for m, by_g in summary.items()},
              "backbone": {str(g): {k: v for k, v in b.items() if k != "per_test_set"} for g, b in backbone.items()},
              "claims": claims, "records": records, "timing": timing, "command": command, "machine": _machine(),
              "figures": {k: os.path.relpath(v, out) for k, v in figs.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(argv)


if __name__ == "__main__":
    main()
