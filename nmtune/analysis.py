"""Spectral analysis and reporting for noisy pre-training studies.

* :func:`feature_spectrum` / :func:`spectrum_summary`: singular values, SVE, LSVR and
  effective rank of a feature matrix (the authors' convention: rows L2-normalised).
* :func:`summarize_records`: mean ± std over seeds of per-task evaluation records,
  averaged over ID tasks and over OOD (task, target domain) pairs as in the paper.
* :func:`check_claims`: the paper's claims, each decided from the numbers.
* :func:`plot_noise_curves`, :func:`plot_spectral_metrics`, :func:`plot_method_comparison`,
  :func:`plot_spectra`: analogues of the paper's Figures 2, 3 and 5 (matplotlib,
  imported lazily: ``pip install "nmtune[examples]"``).

Record schema (one dict per tuned head and test set)::

    {"gamma": 0.05, "method": "nmtune", "kind": "id" | "ood", "task": "digits",
     "domain": "test", "seed": 0, "fraction": 1.0,
     "accuracy": 0.93, "macro_f1": 0.92, "sve": 4.1, "lsvr": 1.2}
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import torch

from nmtune import functional as NF

__all__ = [
    "feature_spectrum",
    "spectrum_summary",
    "mean_std",
    "summarize_records",
    "check_claims",
    "claims_markdown",
    "plot_noise_curves",
    "plot_spectral_metrics",
    "plot_method_comparison",
    "plot_spectra",
]

METRICS = ("accuracy", "macro_f1", "sve", "lsvr")


def feature_spectrum(features: torch.Tensor, *, normalize_rows: bool = True) -> torch.Tensor:
    """Singular values (float64, descending) of a feature matrix ``(M, D)``.

    Example:
        >>> s = feature_spectrum(torch.eye(3))
        >>> [round(v, 3) for v in s.tolist()]
        [1.0, 1.0, 1.0]
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or not features.is_floating_point():
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a floating-point (M, D) tensor, got {got}")
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows for a spectrum, got shape {tuple(features.shape)}")
    return NF.singular_values(features.detach(), normalize_rows=normalize_rows).double().cpu()


def spectrum_summary(features: torch.Tensor, *, normalize_rows: bool = True) -> dict[str, float]:
    """SVE, LSVR, effective rank and the top singular value share of ``features``.

    Example:
        >>> m = spectrum_summary(torch.eye(4))
        >>> round(m["sve"], 4), round(m["lsvr"], 4)
        (1.3863, 1.3863)
    """
    s = feature_spectrum(features, normalize_rows=normalize_rows)
    m = NF.spectrum_metrics(s)
    sve = float(m["sve"])
    return {"sve": sve, "lsvr": float(m["lsvr"]), "effective_rank": math.exp(sve),
            "top1_share": float(s[0] / s.sum().clamp_min(1e-300))}


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([1.0, 3.0])
        (2.0, 1.4142135623730951)
    """
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd


def summarize_records(
    records: Sequence[Mapping[str, Any]], *, fraction: float | None = 1.0
) -> dict[str, dict[float, dict[str, dict[str, tuple[float, float]]]]]:
    """``summary[method][gamma][kind][metric] = (mean, std)`` over seeds.

    Each seed's score is first averaged over the ID tasks (``kind == "id"``) or over
    the OOD (task, target domain) pairs; mean and std are then taken across seeds.

    Args:
        records: evaluation records (see the module docstring).
        fraction: keep only this downstream data fraction (``None``: all, averaged).

    Example:
        >>> r = [dict(gamma=0.0, method="lp", kind="id", task="t", domain="test", seed=s,
        ...           fraction=1.0, accuracy=a, macro_f1=a, sve=1.0, lsvr=1.0) for s, a in [(0, .8), (1, .6)]]
        >>> [round(v, 4) for v in summarize_records(r)["lp"][0.0]["id"]["accuracy"]]
        [0.7, 0.1414]
    """
    per_seed: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if fraction is not None and not math.isclose(float(r["fraction"]), fraction):
            continue
        per_seed[(r["method"], float(r["gamma"]), r["kind"], r["seed"])].append(r)
    by_group: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (method, gamma, kind, _seed), rows in per_seed.items():
        for m in METRICS:
            by_group[(method, gamma, kind)][m].append(sum(float(x[m]) for x in rows) / len(rows))
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (method, gamma, kind), metrics in sorted(by_group.items()):
        out[method][gamma][kind] = {m: mean_std(v) for m, v in metrics.items()}
    return {k: dict(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- claims


def _series(summary, method: str, kind: str, metric: str, gammas: Sequence[float]) -> list[tuple[float, float]]:
    return [summary[method][g][kind][metric] for g in gammas]


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    def ranks(v):  # average ranks for ties
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else 0.0


def _fmt(v: float, pct: bool = True) -> str:
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


def check_claims(
    summary: Mapping[str, Any],
    *,
    backbone: Mapping[float, Mapping[str, float]] | None = None,
    pretrain_accuracy: Mapping[float, float] | None = None,
    base_method: str = "lp",
) -> list[dict[str, Any]]:
    """Decide each of the paper's claims from this run's numbers.

    Args:
        summary: output of :func:`summarize_records` (needs ``"lp"``, ``"mlp"`` and
            ``"nmtune"`` for the method claims; missing methods skip those claims).
        backbone: ``{gamma: {"id_sve": ..., "ood_lsvr": ...}}`` of the frozen
            pre-trained features (Figure 3).
        pretrain_accuracy: ``{gamma: validation accuracy}`` of pre-training.
        base_method: the method whose curves stand for "the pre-trained features"
            in the noise claims (the paper uses linear probing).

    Returns:
        One dict per claim: ``claim`` (the paper's statement), ``reproduced``
        (``True``/``False``), ``evidence`` (the numbers), and ``margin_vs_std``
        (``"clear"`` when the deciding difference exceeds the seed std, else
        ``"within noise"``; ``"-"`` where it does not apply).

    Example:
        >>> s = {"lp": {g: {"id": {"accuracy": (a, 0.0)}, "ood": {"accuracy": (b, 0.0)}}
        ...             for g, a, b in [(0.0, .80, .6), (0.05, .82, .55), (0.1, .81, .5)]}}
        >>> [c["reproduced"] for c in check_claims(s)][:2]
        [True, True]
    """
    claims: list[dict[str, Any]] = []
    base = summary[base_method]
    gammas = sorted(base)
    clean = gammas[0]
    slight = [g for g in gammas if 0 < g <= 0.1 + 1e-9]

    def add(claim, ok, evidence, diff=None, std=None):
        margin = "-" if diff is None else ("clear" if abs(diff) > (std or 0.0) else "within noise")
        claims.append({"claim": claim, "reproduced": bool(ok), "evidence": evidence, "margin_vs_std": margin})

    id_acc = _series(summary, base_method, "id", "accuracy", gammas) if "id" in base[clean] else None
    ood_acc = _series(summary, base_method, "ood", "accuracy", gammas) if "ood" in base[clean] else None
    tag = base_method.upper()
    if id_acc and slight:
        best = max(slight, key=lambda g: base[g]["id"]["accuracy"][0])
        d = base[best]["id"]["accuracy"][0] - id_acc[0][0]
        sd = max(base[best]["id"]["accuracy"][1], id_acc[0][1])
        add(f"Slight noise (5-10%) helps ID transfer ({tag})", d > 0,
            f"ID acc: clean {_fmt(id_acc[0][0])}, best slight ({100 * best:g}%) {_fmt(base[best]['id']['accuracy'][0])}"
            f" (diff {100 * d:+.2f}, seed std {100 * sd:.2f})", d, sd)
        worst = gammas[-1]
        d2 = base[worst]["id"]["accuracy"][0] - base[best]["id"]["accuracy"][0]
        add(f"More noise ({100 * worst:g}%) hurts ID transfer ({tag})", d2 < 0,
            f"ID acc at {100 * worst:g}%: {_fmt(base[worst]['id']['accuracy'][0])} vs best slight "
            f"{_fmt(base[best]['id']['accuracy'][0])} (diff {100 * d2:+.2f})", d2, base[worst]["id"]["accuracy"][1])
    if ood_acc and len(gammas) > 1:
        means = [m for m, _ in ood_acc]
        mono = all(b < a for a, b in zip(means, means[1:]))
        d = means[1] - means[0]
        add(f"Any noise hurts OOD transfer ({tag}: OOD acc at {100 * gammas[1]:g}% < clean)", d < 0,
            f"OOD acc: clean {_fmt(means[0])}, {100 * gammas[1]:g}% {_fmt(means[1])} (diff {100 * d:+.2f}, "
            f"seed std {100 * ood_acc[0][1]:.2f})", d, ood_acc[0][1])
        add(f"OOD accuracy decreases monotonically with noise ({tag})", mono,
            "OOD acc by gamma: " + ", ".join(_fmt(m) for m in means)
            + f"; Spearman(gamma, acc) = {_spearman(gammas, means):+.2f}")
    if backbone:
        bg = sorted(backbone)
        for key, name in (("id_sve", "SVE of the pre-trained features (ID test data) rises with noise"),
                          ("ood_lsvr", "LSVR of the pre-trained features (OOD test data) rises with noise")):
            vals = [backbone[g][key] for g in bg if key in backbone[g]]
            if len(vals) == len(bg) and len(bg) > 1:
                rho = _spearman(bg, vals)
                add(name, rho > 0 and vals[-1] > vals[0],
                    f"{key} by gamma: " + ", ".join(f"{v:.4f}" for v in vals) + f"; Spearman {rho:+.2f}")
    if pretrain_accuracy and len(pretrain_accuracy) > 1:
        pg = sorted(pretrain_accuracy)
        vals = [pretrain_accuracy[g] for g in pg]
        add("Pre-training accuracy (clean validation labels) falls as noise rises",
            all(b <= a for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0],
            "val acc by gamma: " + ", ".join(_fmt(v) for v in vals))
    if all(m in summary for m in ("lp", "mlp", "nmtune")):
        for kind in ("id", "ood"):
            if kind not in summary["nmtune"][clean]:
                continue
            for metric in ("accuracy", "macro_f1"):
                nm = [summary["nmtune"][g][kind][metric][0] for g in gammas]
                lp = [summary["lp"][g][kind][metric][0] for g in gammas]
                ml = [summary["mlp"][g][kind][metric][0] for g in gammas]
                wins = sum(n > max(a, b) for n, a, b in zip(nm, lp, ml))
                avg = [sum(v) / len(v) for v in (nm, lp, ml)]
                d = avg[0] - max(avg[1:])
                sd = max(summary["nmtune"][g][kind][metric][1] for g in gammas)
                add(f"NMTune beats LP and MLP tuning on {kind.upper()} {metric.replace('macro_f1', 'macro-F1')} "
                    "(mean over gamma)", d > 0,
                    f"NMTune {_fmt(avg[0])} vs LP {_fmt(avg[1])} vs MLP {_fmt(avg[2])}; NMTune best at "
                    f"{wins}/{len(gammas)} noise ratios", d, sd)
        if "id" in summary["nmtune"][clean]:
            f1 = {m: [summary[m][g]["id"]["macro_f1"][0] for g in gammas] for m in ("lp", "mlp", "nmtune")}
            argmax = {m: gammas[max(range(len(gammas)), key=lambda i: f1[m][i])] for m in f1}
            best = argmax["nmtune"]
            add("With NMTune the clean pre-trained model is best on ID (noise effect rectified)", best == clean,
                f"ID F1 argmax over gamma: NMTune {100 * best:g}%, MLP {100 * argmax['mlp']:g}%, LP "
                f"{100 * argmax['lp']:g}%")
            if argmax["mlp"] == clean and argmax["lp"] == clean:
                claims[-1]["margin_vs_std"] = "uninformative: LP and MLP also peak at the clean model"
            sve = {m: sum(summary[m][g]["id"]["sve"][0] for g in gammas) / len(gammas) for m in ("mlp", "nmtune")}
            add("NMTune's features have higher SVE than MLP tuning's on ID", sve["nmtune"] > sve["mlp"],
                f"mean ID SVE: NMTune {sve['nmtune']:.4f}, MLP {sve['mlp']:.4f}")
            sve_lp = sum(summary["lp"][g]["id"]["sve"][0] for g in gammas) / len(gammas)
            add("MLP tuning lowers SVE compared to LP (sparser features)", sve["mlp"] < sve_lp,
                f"mean ID SVE: MLP {sve['mlp']:.4f}, LP {sve_lp:.4f}")
        if "ood" in summary["nmtune"][clean]:
            ls = {m: sum(summary[m][g]["ood"]["lsvr"][0] for g in gammas) / len(gammas) for m in ("mlp", "nmtune")}
            add("NMTune's features have lower LSVR than MLP tuning's on OOD", ls["nmtune"] < ls["mlp"],
                f"mean OOD LSVR: NMTune {ls['nmtune']:.4f}, MLP {ls['mlp']:.4f}")
            if len(gammas) > 1:
                gap = {m: summary[m][clean]["ood"]["macro_f1"][0] - summary[m][gammas[1]]["ood"]["macro_f1"][0]
                       for m in ("lp", "mlp", "nmtune")}
                add(f"NMTune narrows the OOD F1 gap between clean and {100 * gammas[1]:g}% noise",
                    abs(gap["nmtune"]) < min(abs(gap["lp"]), abs(gap["mlp"])),
                    "clean minus noisy OOD F1: " + ", ".join(f"{m.upper()} {100 * v:+.2f}" for m, v in gap.items()))
    return claims


def claims_markdown(claims: Sequence[Mapping[str, Any]]) -> str:
    """The claims as a markdown table (``| claim | reproduced | margin | evidence |``).

    Example:
        >>> print(claims_markdown([{"claim": "c", "reproduced": True, "margin_vs_std": "-", "evidence": "e"}]))
        | paper claim | reproduced here | margin vs seed std | evidence |
        |---|---|---|---|
        | c | yes | - | e |
    """
    lines = ["| paper claim | reproduced here | margin vs seed std | evidence |", "|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['claim']} | {'yes' if c['reproduced'] else 'NO'} | {c['margin_vs_std']} | {c['evidence']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError('plots need matplotlib: pip install "nmtune[examples]"') from err
    return plt


def _save(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


def plot_noise_curves(
    summaries_by_fraction: Mapping[float, Mapping[str, Any]], path: str | os.PathLike, *, method: str = "lp"
) -> str:
    """Figure 2 analogue: average ID and OOD accuracy vs pre-training noise, one line per
    downstream data fraction. ``summaries_by_fraction[f]`` is a :func:`summarize_records` output.

    Example:
        >>> plot_noise_curves({1.0: summarize_records(records)}, "fig2.png")  # doctest: +SKIP
    """
    plt = _plt()
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
        ax.set_xlabel("pre-training noise ratio (%)")
        ax.set_ylabel(f"avg {kind.upper()} accuracy (%)")
        ax.set_title(f"{kind.upper()} ({method.upper()})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_spectral_metrics(
    backbone: Mapping[float, Mapping[str, Any]], path: str | os.PathLike
) -> str:
    """Figure 3 analogue. ``backbone[gamma]`` holds ``id_sve``, ``ood_lsvr`` and optional
    per-task points ``id_points`` / ``ood_points`` (lists of ``(metric, accuracy)``).

    Example:
        >>> plot_spectral_metrics({0.0: {"id_sve": 3.6, "ood_lsvr": 1.6},
        ...                        0.1: {"id_sve": 3.9, "ood_lsvr": 1.9}}, "fig3.png")  # doctest: +SKIP
    """
    plt = _plt()
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
    return _save(fig, path)


def plot_method_comparison(summary: Mapping[str, Any], path: str | os.PathLike,
                           methods: Sequence[str] = ("lp", "mlp", "nmtune")) -> str:
    """Figure 5 analogue: ID F1, ID SVE, OOD F1, OOD LSVR vs noise for each method.

    Example:
        >>> plot_method_comparison(summarize_records(records), "fig5.png")  # doctest: +SKIP
    """
    plt = _plt()
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
    return _save(fig, path)


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: str | os.PathLike, *, title: str = "") -> str:
    """Normalised singular value spectra (``s_i / sum s``, log scale), one line per entry.

    Example:
        >>> plot_spectra({"clean": feature_spectrum(torch.randn(64, 8)).tolist()}, "s.png")  # doctest: +SKIP
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, s in spectra.items():
        t = torch.as_tensor(list(s), dtype=torch.float64)
        ax.plot(range(1, len(t) + 1), (t / t.sum().clamp_min(1e-300)).tolist(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("s_i / sum s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
