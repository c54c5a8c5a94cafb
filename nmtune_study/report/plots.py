"""The report's figures (matplotlib, Agg): each function draws data it is given into one PNG."""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from nmtune_study.report.diagnosis import MEMORISED_BAR
from nmtune_study.report.records import method_name

__all__ = ["plot_ablation", "plot_clip_curves", "plot_clip_noise_accuracy", "plot_forest", "plot_memorisation",
           "plot_method_comparison", "plot_noise_curves", "plot_spectra", "plot_spectral_metrics", "pyplot",
           "save_figure"]


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError('plots need matplotlib: pip install "nmtune[examples]"') from err
    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return str(path)


def plot_forest(claims: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> str:
    """Every claim's estimate with its 95% interval, one panel per unit, signed so that
    the paper's direction points right (a dashed line at 0).

    Example:
        >>> plot_forest(claims, "forest.png")  # doctest: +SKIP
    """
    plt = pyplot()
    units = list(dict.fromkeys(c["unit"] for c in claims))
    heights = [sum(c["unit"] == u for c in claims) for u in units]
    fig, axes = plt.subplots(len(units), 1, figsize=(10, 0.5 * sum(heights) + 1.4 * len(units)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"reproduced": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}
    for ax, u in zip(axes[:, 0], units):
        cs = [c for c in claims if c["unit"] == u]
        for i, c in enumerate(cs):
            d = c["direction"]
            lo, hi = sorted((d * c["ci_low"], d * c["ci_high"]))
            ax.plot([lo, hi], [i, i], color=colors[c["verdict"]], lw=2)
            ax.plot([d * c["estimate"]], [i], "o", color=colors[c["verdict"]])
        ax.axvline(0, color="k", ls="--", lw=0.8)
        ax.set_yticks(range(len(cs)))
        ax.set_yticklabels([textwrap.fill(re.sub(r" \([^()]*\)$", "", c["claim"]), 48) for c in cs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"estimate in the paper's direction ({u}); right of 0 = as the paper says")
        ax.grid(alpha=0.3, axis="x")
    if title:
        axes[0, 0].set_title(title)
    return save_figure(fig, path)


def plot_ablation(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> str:
    """Bar chart of an :func:`ablation_table`: accuracy per variant and method with 95%
    intervals, one panel per test kind (ID / OOD).

    Example:
        >>> plot_ablation(ablation_table(records, "terms"), "terms.png")  # doctest: +SKIP
    """
    plt = pyplot()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sub = [r for r in rows if r["kind"] == kind]
        variants = list(dict.fromkeys(r["variant"] for r in sub))
        methods = list(dict.fromkeys(r["method"] for r in sub))
        w = 0.8 / len(methods)
        for j, m in enumerate(methods):
            xs, ys, err = [], [], [[], []]
            for i, v in enumerate(variants):
                r = next((r for r in sub if r["variant"] == v and r["method"] == m), None)
                if r is None:
                    continue
                lv = r["level"]
                xs.append(i + (j - (len(methods) - 1) / 2) * w)
                ys.append(lv["estimate"])
                err[0].append(lv["estimate"] - lv["ci_low"])
                err[1].append(lv["ci_high"] - lv["estimate"])
            ax.bar(xs, ys, width=w, yerr=err, capsize=3, label=method_name(m))
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, fontsize=8, rotation=20)
        ys_all = [r["level"]["ci_low"] for r in sub]
        ax.set_ylim(max(0.0, min(ys_all) - 5), max(r["level"]["ci_high"] for r in sub) + 2)
        ax.set_ylabel(f"{kind.upper()} accuracy (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_noise_curves(
    summaries_by_fraction: Mapping[float, Mapping[str, Any]], path: str | os.PathLike, *, method: str = "lp"
) -> str:
    """Figure 2 analogue: average ID and OOD accuracy vs pre-training noise, one line per
    downstream data fraction. ``summaries_by_fraction[f]`` is a :func:`summarize_records` output.

    Example:
        >>> plot_noise_curves({1.0: summarize_records(records)}, "fig2.png")  # doctest: +SKIP
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("id", "ood")):
        for frac, summ in sorted(summaries_by_fraction.items()):
            if method not in summ:
                continue
            gs = sorted(g for g in summ[method] if kind in summ[method][g])
            if not gs:
                continue
            m = [100 * summ[method][g][kind]["accuracy"][0] for g in gs]
            s = [100 * summ[method][g][kind]["accuracy"][1] for g in gs]
            ax.errorbar([100 * g for g in gs], m, yerr=s, marker="o", capsize=3, label=f"{100 * frac:g}% data")
        _accuracy_axes(ax, "pre-training noise ratio (%)", kind, f"{kind.upper()} ({method.upper()})")
    return save_figure(fig, path)


def _accuracy_axes(ax: Any, xlabel: str, kind: str, title: str) -> None:
    """Labels, title, grid and legend of an accuracy-against-noise panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"avg {kind.upper()} accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_spectral_metrics(
    backbone: Mapping[float, Mapping[str, Any]], path: str | os.PathLike
) -> str:
    """Figure 3 analogue. ``backbone[gamma]`` holds ``id_sve``, ``ood_lsvr`` and optional
    per-task points ``id_points`` / ``ood_points`` (lists of ``(metric, accuracy)``).

    Example:
        >>> plot_spectral_metrics({0.0: {"id_sve": 3.6, "ood_lsvr": 1.6},
        ...                        0.1: {"id_sve": 3.9, "ood_lsvr": 1.9}}, "fig3.png")  # doctest: +SKIP
    """
    plt = pyplot()
    gs = sorted(backbone)
    has_points = all("id_points" in backbone[g] for g in gs)
    fig, axes = plt.subplots(1, 4 if has_points else 2, figsize=(15 if has_points else 8, 3.5))
    for ax, key, label in ((axes[0], "id_sve", "SVE (ID test features)"), (axes[1], "ood_lsvr", "LSVR (OOD test features)")):
        ax.plot([100 * g for g in gs], [backbone[g][key] for g in gs], marker="o")
        ax.set_xlabel("pre-training noise ratio (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if has_points:
        cmap = plt.get_cmap("viridis")
        for ax, key, label in ((axes[2], "id_points", "SVE"), (axes[3], "ood_points", "LSVR")):
            for i, g in enumerate(gs):
                pts = backbone[g][key]
                ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], color=cmap(i / max(1, len(gs) - 1)),
                           label=f"{100 * g:g}%", s=25)
            ax.set_xlabel(f"{label} per task")
            ax.set_ylabel("LP accuracy (%)")
            ax.legend(fontsize=7, title="noise")
            ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_method_comparison(summary: Mapping[str, Any], path: str | os.PathLike,
                           methods: Sequence[str] = ("lp", "mlp", "nmtune")) -> str:
    """Figure 5 analogue: ID F1, ID SVE, OOD F1, OOD LSVR vs noise for each method.

    Example:
        >>> plot_method_comparison(summarize_records(records), "fig5.png")  # doctest: +SKIP
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = (("id", "macro_f1", "avg ID macro-F1 (%)"), ("id", "sve", "ID SVE"),
              ("ood", "macro_f1", "avg OOD macro-F1 (%)"), ("ood", "lsvr", "OOD LSVR"))
    for ax, (kind, metric, label) in zip(axes, panels):
        for m in methods:
            if m not in summary:
                continue
            gs = sorted(g for g in summary[m] if kind in summary[m][g])
            scale = 100 if metric == "macro_f1" else 1
            ax.errorbar([100 * g for g in gs], [scale * summary[m][g][kind][metric][0] for g in gs],
                        yerr=[scale * summary[m][g][kind][metric][1] for g in gs], marker="o", capsize=3,
                        label=m.upper() if m != "nmtune" else "NMTune")
        ax.set_xlabel("pre-training noise ratio (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: str | os.PathLike, *, title: str = "") -> str:
    """Normalised singular value spectra (``s_i / sum s``, log scale), one line per entry.

    Example:
        >>> plot_spectra({"clean": [3.0, 2.0, 1.0]}, "s.png")  # doctest: +SKIP
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, s in spectra.items():
        t = np.asarray(list(s), dtype=np.float64)
        ax.plot(range(1, len(t) + 1), t / max(t.sum(), 1e-300), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / sum s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_memorisation(curves: Mapping[float, Mapping[int, Sequence[Mapping[str, Any]]]], path: Any, *,
                      title: str = "") -> str | None:
    """Memorised fraction and clean validation accuracy against epoch, one line per gamma
    (mean over pre-training seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for g in sorted(curves):
        by_epoch: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for hist in curves[g].values():
            for h in hist:
                for k in ("memorised", "val_accuracy"):
                    if h.get(k) is not None and math.isfinite(float(h[k])):
                        by_epoch[int(h["epoch"])][k].append(float(h[k]))
        epochs = sorted(by_epoch)
        for ax, key in zip(axes, ("memorised", "val_accuracy")):
            pts = [(e, np.mean(by_epoch[e][key])) for e in epochs if by_epoch[e][key]]
            if pts and (key != "memorised" or g > 0):
                ax.plot(*zip(*pts), marker=".", label=f"{100 * g:g}%")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].axhline(MEMORISED_BAR, color="grey", ls=":", lw=1)
    axes[0].set(xlabel="pre-training epoch", ylabel="memorised fraction (flipped labels / swapped captions)", ylim=(0, 1.02))
    axes[1].set(xlabel="pre-training epoch", ylabel="clean validation accuracy (zero-shot for CLIP)")
    for ax in axes:
        ax.legend(title="noise", fontsize=8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_clip_noise_accuracy(summary: Mapping[str, Any], path: str | os.PathLike, methods: Sequence[str]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind in zip(axes, ("id", "ood")):
        for m in methods:
            gs = sorted(g for g in summary.get(m, {}) if kind in summary[m][g])
            if gs:
                ax.errorbar([100 * g for g in gs], [100 * summary[m][g][kind]["accuracy"][0] for g in gs],
                            yerr=[100 * summary[m][g][kind]["accuracy"][1] for g in gs], marker="o", capsize=3,
                            label=method_name(m))
        _accuracy_axes(ax, "swapped image-text pairs (%)", kind, f"CLIP, {kind.upper()}")
    return save_figure(fig, path)


def plot_clip_curves(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> str:
    plt = pyplot()
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
    return save_figure(fig, path)
