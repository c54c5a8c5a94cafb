"""The study's report: record schema, summaries, the paper's claims with intervals, figures.

Record schema (one dict per tuned head and test set)::

    {"regime": "supervised" | "contrastive", "gamma": 0.05, "pretrain_seed": 0,
     "method": "lp" | "mlp" | "nmtune" | "zeroshot", "kind": "id" | "ood",
     "task": "digits", "domain": "test", "seed": 0, "fraction": 1.0,
     "accuracy": 0.93, "macro_f1": 0.92, "sve": 4.1, "lsvr": 1.2}

Tuned records (not zero-shot) also carry ``protocol`` (``"selected"`` or ``"paper"``), ``lr``,
``train_loss`` and, for NMTune, ``regularizer_scale`` (``evaluate.tune_and_score``); a report
decides its claims on one protocol's records (``_diagnosis.by_protocol``). Ablation records
carry two more keys, ``ablation`` (its name) and ``variant`` (the setting); :func:`check_claims`
ignores them.

Each claim is decided by :mod:`_stats` from *paired* cells: a cell ``[p, t]`` of every
method and noise ratio comes from pre-training seed ``p`` and tuning seed ``t`` (same
pre-trained model, tuning seed and data split), so differences are taken cell by cell
and the interval is a hierarchical bootstrap (pre-training seeds first).
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

import _stats as S
from _common import mean_std

__all__ = [
    "RECORD_KEYS",
    "ablation_table",
    "ablation_markdown",
    "check_claims",
    "claims_markdown",
    "grid",
    "plot_ablation",
    "plot_forest",
    "plot_method_comparison",
    "plot_noise_curves",
    "plot_spectra",
    "plot_spectral_metrics",
    "summarize_records",
    "verdict_counts",
    "write_report",
]

RECORD_KEYS = ("regime", "gamma", "pretrain_seed", "method", "kind", "task", "domain", "seed", "fraction",
               "accuracy", "macro_f1", "sve", "lsvr")
METRICS = ("accuracy", "macro_f1", "sve", "lsvr")
_NAMES = {"lp": "LP", "mlp": "MLP", "nmtune": "NMTune", "zeroshot": "zero-shot"}


def _name(m: str) -> str:
    return _NAMES.get(m, m.upper())


# ----------------------------------------------------------------------------- cells


def _cells(records: Iterable[Mapping[str, Any]], fraction: float | None) -> dict[tuple, float]:
    """``{(method, gamma, kind, pretrain_seed, seed): value per metric}``: each (pre-training
    seed, tuning seed) cell averaged over the ID tasks or the OOD (task, domain) pairs."""
    acc: dict[tuple, list] = defaultdict(list)
    for r in records:
        if "ablation" in r or (fraction is not None and not math.isclose(float(r["fraction"]), fraction)):
            continue
        acc[(r["method"], float(r["gamma"]), r["kind"], int(r.get("pretrain_seed", 0)), int(r["seed"]))].append(r)
    return {k: {m: sum(float(x[m]) for x in rows) / len(rows) for m in METRICS} for k, rows in acc.items()}


def grid(cells: Mapping[tuple, Mapping[str, float]], methods: Sequence[str], gammas: Sequence[float], kind: str,
         metric: str, scale: float = 1.0) -> np.ndarray:
    """``(P, T, M, G)`` array of one metric: pre-training seeds x tuning seeds x methods x
    noise ratios. A method scored once per pre-trained model (zero-shot) is repeated over
    the tuning seeds.

    Raises:
        KeyError: a cell is missing (the comparison would not be paired).

    Example:
        >>> c = {("lp", 0.0, "id", p, t): {"accuracy": p + t / 10} for p in (0, 1) for t in (0, 1)}
        >>> grid(c, ["lp"], [0.0], "id", "accuracy").shape
        (2, 2, 1, 1)
    """
    pseeds = sorted({k[3] for k in cells})
    tseeds = sorted({k[4] for k in cells if k[0] in methods and k[0] != "zeroshot"} or {k[4] for k in cells})
    out = np.empty((len(pseeds), len(tseeds), len(methods), len(gammas)))
    for i, p in enumerate(pseeds):
        for j, t in enumerate(tseeds):
            for a, m in enumerate(methods):
                for b, g in enumerate(gammas):
                    key = (m, float(g), kind, p, t)
                    if key not in cells:
                        alt = [k for k in cells if k[:4] == key[:4]]
                        if len(alt) != 1:
                            raise KeyError(f"no paired cell {key} (method, gamma, kind, pretrain_seed, seed)")
                        key = alt[0]
                    out[i, j, a, b] = scale * cells[key][metric]
    return out


def summarize_records(
    records: Sequence[Mapping[str, Any]], *, fraction: float | None = 1.0
) -> dict[str, dict[float, dict[str, dict[str, tuple[float, float]]]]]:
    """``summary[method][gamma][kind][metric] = (mean, std)`` over (pre-training seed,
    tuning seed) cells; each cell first averaged over ID tasks or OOD (task, domain) pairs.

    Example:
        >>> r = [dict(gamma=0.0, method="lp", kind="id", task="t", domain="test", seed=s,
        ...           fraction=1.0, accuracy=a, macro_f1=a, sve=1.0, lsvr=1.0) for s, a in [(0, .8), (1, .6)]]
        >>> [round(v, 4) for v in summarize_records(r)["lp"][0.0]["id"]["accuracy"]]
        [0.7, 0.1414]
    """
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (method, gamma, kind, _p, _t), vals in _cells(records, fraction).items():
        for m in METRICS:
            groups[(method, gamma, kind)][m].append(vals[m])
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (method, gamma, kind), metrics in sorted(groups.items()):
        out[method][gamma][kind] = {m: mean_std(v) for m, v in metrics.items()}
    return {k: dict(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- claims


def _mean_pt(x: np.ndarray) -> np.ndarray:
    """Replicates ``(B, P, T, ...)`` -> ``(B, ...)``: the mean over seeds."""
    return x.mean(axis=(1, 2))


def _per_seed(values: Mapping[float, Mapping[int, float]], gammas: Sequence[float]) -> np.ndarray | None:
    """``{gamma: {pretrain_seed: v}}`` -> ``(P, 1, G)`` (None if incomplete)."""
    seeds = sorted(set.intersection(*(set(values.get(g, {})) for g in gammas))) if gammas else []
    if not seeds:
        return None
    return np.array([[[values[g][s] for g in gammas]] for s in seeds], dtype=np.float64)


def _claim(claims: list, name: str, data: np.ndarray, stat: Callable, direction: int, unit: str,
           evidence: str, seed: int) -> None:
    both, boot, t = S.study_interval(data, stat, seed=seed, bounds=(-1.0, 1.0) if unit == "rho" else
                                     (-math.inf, math.inf))
    claims.append({
        "claim": name, "verdict": S.verdict(both.low, both.high, direction), **both.as_dict(), "direction": direction,
        "unit": unit, "evidence": evidence, "per_pretrain_seed": [float(stat(data[p:p + 1][None])[0])
                                                                  for p in range(data.shape[0])],
        "boot_low": boot.low, "boot_high": boot.high, "boot_verdict": S.verdict(boot.low, boot.high, direction),
        "t_low": t.low, "t_high": t.high, "t_verdict": S.verdict(t.low, t.high, direction),
    })


def _noise_claims(claims: list, cells, gammas, base: str, seed: int) -> None:
    tag = _name(base)
    clean, slight = 0, [i for i, g in enumerate(gammas) if 0 < g <= 0.1 + 1e-9]
    pct = [f"{100 * g:g}%" for g in gammas]
    has = {k: any(c[0] == base and c[2] == k for c in cells) for k in ("id", "ood")}
    if has["id"] and slight:
        a = grid(cells, [base], gammas, "id", "accuracy", 100)[:, :, 0]  # (P, T, G)
        means = a.mean(axis=(0, 1))
        _claim(claims, f"Slight noise ({', '.join(pct[i] for i in slight)}) helps ID transfer ({tag})", a,
               lambda x: _mean_pt(x)[:, slight].mean(axis=1) - _mean_pt(x)[:, clean], +1, "points",
               "ID acc by gamma: " + ", ".join(f"{v:.2f}" for v in means), seed)
        _claim(claims, f"More noise ({pct[-1]}) hurts ID transfer compared with slight noise ({tag})", a,
               lambda x: _mean_pt(x)[:, -1] - _mean_pt(x)[:, slight].mean(axis=1), -1, "points",
               f"ID acc at {pct[-1]} {means[-1]:.2f} vs slight {means[slight].mean():.2f}", seed)
    if has["ood"] and len(gammas) > 1:
        o = grid(cells, [base], gammas, "ood", "accuracy", 100)[:, :, 0]
        means = o.mean(axis=(0, 1))
        _claim(claims, f"Any noise hurts OOD transfer ({tag}: OOD acc at {pct[1]} < clean)", o,
               lambda x: _mean_pt(x)[:, 1] - _mean_pt(x)[:, 0], -1, "points",
               f"OOD acc clean {means[0]:.2f}, {pct[1]} {means[1]:.2f}", seed)
        _claim(claims, f"OOD accuracy decreases monotonically with noise ({tag}; Spearman rho per pre-training seed)",
               o, S.rank_trend(gammas), -1, "rho", "OOD acc by gamma: " + ", ".join(f"{v:.2f}" for v in means), seed)


def _trend_claims(claims: list, backbone, pretrain_accuracy, gammas, seed: int) -> None:
    for key, name, d in (("id_sve", "SVE of the pre-trained features (ID test data) rises with noise", +1),
                         ("ood_lsvr", "LSVR of the pre-trained features (OOD test data) rises with noise", +1)):
        vals = {g: {p: b[key] for p, b in backbone.get(g, {}).items() if key in b} for g in gammas}
        data = _per_seed(vals, gammas)
        if data is not None and len(gammas) > 1:
            _claim(claims, name + " (Spearman rho per pre-training seed)", data, S.rank_trend(gammas), d, "rho",
                   f"mean {key} by gamma: " + ", ".join(f"{v:.3f}" for v in data.mean(axis=(0, 1))), seed)
    if pretrain_accuracy:
        data = _per_seed(pretrain_accuracy, gammas)
        if data is not None and len(gammas) > 1:
            _claim(claims, "Pre-training accuracy (clean validation labels) falls as noise rises (Spearman rho)",
                   100 * data, S.rank_trend(gammas), -1, "rho",
                   "mean val acc by gamma: " + ", ".join(f"{v:.2f}" for v in 100 * data.mean(axis=(0, 1))), seed)


def _beats_both(x: np.ndarray) -> np.ndarray:
    """``(B, P, T, 3, G)`` with methods (NMTune, LP, MLP) -> the smaller margin, mean over gamma."""
    m = _mean_pt(x)
    return np.minimum((m[:, 0] - m[:, 1]).mean(axis=-1), (m[:, 0] - m[:, 2]).mean(axis=-1))


def _method_claims(claims: list, cells, gammas, seed: int) -> None:
    three = ("nmtune", "lp", "mlp")
    kinds = [k for k in ("id", "ood") if all(any(c[0] == m and c[2] == k for c in cells) for m in three)]
    for kind in kinds:
        for metric in ("accuracy", "macro_f1"):
            a = grid(cells, three, gammas, kind, metric, 100)  # (P, T, 3, G)
            m = a.mean(axis=(0, 1, 3))
            _claim(claims, f"NMTune beats LP and MLP tuning on {kind.upper()} "
                   f"{metric.replace('macro_f1', 'macro-F1')} (mean over gamma; the smaller of the two margins)", a,
                   _beats_both, +1, "points", f"NMTune {m[0]:.2f}, LP {m[1]:.2f}, MLP {m[2]:.2f}", seed)
    if "id" in kinds and len(gammas) > 1:
        f1 = grid(cells, three, gammas, "id", "macro_f1", 100)
        peak = f1.mean(axis=(0, 1))
        _claim(claims, "With NMTune the clean pre-trained model is best on ID (clean minus best noisy, macro-F1)",
               f1[:, :, 0], lambda x: _mean_pt(x)[:, 0] - _mean_pt(x)[:, 1:].max(axis=-1), +1, "points",
               "argmax over gamma: " + ", ".join(f"{_name(m)} {100 * gammas[int(np.argmax(peak[i]))]:g}%"
                                                 for i, m in enumerate(three)), seed)
    if "id" in kinds:
        sve = grid(cells, three, gammas, "id", "sve")
        ms = sve.mean(axis=(0, 1, 3))
        _claim(claims, "NMTune's features have higher SVE than MLP tuning's on ID", sve,
               lambda x: (_mean_pt(x)[:, 0] - _mean_pt(x)[:, 2]).mean(axis=-1), +1, "nats",
               f"mean ID SVE: NMTune {ms[0]:.3f}, MLP {ms[2]:.3f}", seed)
        _claim(claims, "MLP tuning lowers SVE compared with LP (sparser features)", sve,
               lambda x: (_mean_pt(x)[:, 2] - _mean_pt(x)[:, 1]).mean(axis=-1), -1, "nats",
               f"mean ID SVE: MLP {ms[2]:.3f}, LP {ms[1]:.3f}", seed)
    if "ood" in kinds:
        ls = grid(cells, three, gammas, "ood", "lsvr")
        ml = ls.mean(axis=(0, 1, 3))
        _claim(claims, "NMTune's features have lower LSVR than MLP tuning's on OOD", ls,
               lambda x: (_mean_pt(x)[:, 0] - _mean_pt(x)[:, 2]).mean(axis=-1), -1, "nats",
               f"mean OOD LSVR: NMTune {ml[0]:.3f}, MLP {ml[2]:.3f}", seed)
        if len(gammas) > 1:
            f = grid(cells, three, gammas[:2], "ood", "macro_f1", 100)

            def narrower(x):
                gap = np.abs(_mean_pt(x)[:, :, 0] - _mean_pt(x)[:, :, 1])  # (B, 3)
                return gap[:, 0] - np.minimum(gap[:, 1], gap[:, 2])

            gaps = f.mean(axis=(0, 1))
            _claim(claims, f"NMTune narrows the OOD F1 gap between clean and {100 * gammas[1]:g}% noise "
                   "(|NMTune gap| minus the smaller baseline gap)", f, narrower, -1, "points",
                   "clean minus noisy OOD F1: " + ", ".join(f"{_name(m)} {gaps[i, 0] - gaps[i, 1]:+.2f}"
                                                            for i, m in enumerate(three)), seed)


def _zeroshot_claims(claims: list, cells, gammas, seed: int) -> None:
    for kind in ("id", "ood"):
        if not all(any(c[0] == m and c[2] == kind for c in cells) for m in ("nmtune", "zeroshot")):
            continue
        a = grid(cells, ("nmtune", "zeroshot"), gammas, kind, "accuracy", 100)
        m = a.mean(axis=(0, 1, 3))
        _claim(claims, f"NMTune beats zero-shot classification on {kind.upper()} accuracy (mean over gamma)", a,
               lambda x: (_mean_pt(x)[:, 0] - _mean_pt(x)[:, 1]).mean(axis=-1), +1, "points",
               f"NMTune {m[0]:.2f}, zero-shot {m[1]:.2f}", seed)


def check_claims(
    records: Sequence[Mapping[str, Any]],
    *,
    backbone: Mapping[float, Mapping[int, Mapping[str, float]]] | None = None,
    pretrain_accuracy: Mapping[float, Mapping[int, float]] | None = None,
    fraction: float | None = None,
    base_method: str = "lp",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Decide each of the paper's claims with a paired, hierarchical-bootstrap interval.

    Args:
        records: evaluation records (module docstring); ablation records are ignored.
        backbone: ``{gamma: {pretrain_seed: {"id_sve": ..., "ood_lsvr": ...}}}`` of the
            frozen pre-trained features.
        pretrain_accuracy: ``{gamma: {pretrain_seed: validation accuracy}}``.
        fraction: downstream data fraction (default: the largest in ``records``).
        base_method: the method standing for "the pre-trained features" in the noise
            claims (linear probing, as in the paper).
        seed: seed of the bootstrap.

    Returns:
        One dict per claim: ``claim``, ``verdict`` (reproduced / contradicted /
        inconclusive), ``estimate``, ``ci_low``, ``ci_high``, ``n_pretrain``, ``n_tune``,
        ``ci_method``, ``direction`` (+1: the paper says the quantity is positive),
        ``unit``, ``evidence``, ``per_pretrain_seed`` and the t interval over those
        (``t_low``, ``t_high``, ``t_verdict``).

    Example:
        >>> recs = [dict(gamma=g, pretrain_seed=p, method="lp", kind="ood", task="t", domain="d", seed=t,
        ...              fraction=1.0, accuracy=0.9 - g + 0.01 * p, macro_f1=0.5, sve=1.0, lsvr=1.0)
        ...         for g in (0.0, 0.1, 0.2) for p in (0, 1, 2) for t in (0, 1)]
        >>> [c["verdict"] for c in check_claims(recs)]
        ['reproduced', 'reproduced']
    """
    fraction = max(float(r["fraction"]) for r in records if "ablation" not in r) if fraction is None else fraction
    cells = _cells(records, fraction)
    gammas = sorted({k[1] for k in cells})
    claims: list[dict[str, Any]] = []
    _noise_claims(claims, cells, gammas, base_method, seed)
    _trend_claims(claims, backbone or {}, pretrain_accuracy or {}, gammas, seed)
    _method_claims(claims, cells, gammas, seed)
    _zeroshot_claims(claims, cells, gammas, seed)
    return claims


def _fmt_num(v: float | None, unit: str) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:+.2f}" if unit == "points" else f"{v:+.3f}"


def claims_markdown(claims: Sequence[Mapping[str, Any]]) -> str:
    """The claims as a markdown table with estimate and interval.

    Example:
        >>> c = {"claim": "c", "verdict": "reproduced", "estimate": 1.0, "ci_low": 0.5, "ci_high": 1.5,
        ...      "unit": "points", "n_pretrain": 3, "n_tune": 3, "evidence": "e", "t_low": 0.1, "t_high": 2.0}
        >>> print(claims_markdown([c]).splitlines()[2])
        | c | **reproduced** | +1.00 | [+0.50, +1.50] | [-, -] | [+0.10, +2.00] | points | 3 x 3 | e |
    """
    paper = any("paper_verdict" in c for c in claims)
    lines = ["| paper claim | verdict | estimate | 95% CI | bootstrap part | t part | unit "
             "| seeds (pre-train x tune) | evidence |" + (" paper recipe: verdict, estimate [CI] |" if paper else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if paper else "")]
    for c in claims:
        u = c["unit"]
        v = c["verdict"] if c["verdict"] == "inconclusive" else f"**{c['verdict']}**"
        ci, boot, t = ((_fmt_num(c.get(f"{k}_low"), u), _fmt_num(c.get(f"{k}_high"), u)) for k in ("ci", "boot", "t"))
        row = (f"| {c['claim']} | {v} | {_fmt_num(c['estimate'], u)} | [{ci[0]}, {ci[1]}] | [{boot[0]}, "
               f"{boot[1]}] | [{t[0]}, {t[1]}] | {u} | {c['n_pretrain']} x {c['n_tune']} | {c['evidence']} |")
        if paper:
            row += (f" {c.get('paper_verdict', '-')}: {_fmt_num(c.get('paper_estimate'), u)} "
                    f"[{_fmt_num(c.get('paper_ci_low'), u)}, {_fmt_num(c.get('paper_ci_high'), u)}] |")
        lines.append(row)
    return "\n".join(lines)


def verdict_counts(claims: Sequence[Mapping[str, Any]], key: str = "verdict") -> dict[str, int]:
    """``{"reproduced": n, "contradicted": n, "inconclusive": n}``.

    Example:
        >>> verdict_counts([{"verdict": "reproduced"}])
        {'reproduced': 1, 'contradicted': 0, 'inconclusive': 0}
    """
    return {v: sum(c.get(key) == v for c in claims) for v in S.VERDICTS}


# ----------------------------------------------------------------------------- ablations


def ablation_table(records: Sequence[Mapping[str, Any]], ablation: str, *, seed: int = 0) -> list[dict[str, Any]]:
    """Rows ``(variant, method, kind)`` of one ablation: accuracy (points) with its
    interval, and the paired difference to the first variant of the same method.

    Example:
        >>> recs = [dict(ablation="a", variant=v, method="nmtune", gamma=0.0, pretrain_seed=p, kind="id",
        ...              task="t", domain="d", seed=t, fraction=1.0, accuracy=acc + 0.01 * t, macro_f1=0.0,
        ...              sve=0.0, lsvr=0.0) for v, acc in (("full", 0.9), ("-COV", 0.8)) for p in (0, 1)
        ...         for t in (0, 1)]
        >>> [(r["variant"], round(r["diff"]["estimate"], 2)) for r in ablation_table(recs, "a")]
        [('full', 0.0), ('-COV', -10.0)]
    """
    rows = [r for r in records if r.get("ablation") == ablation]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for kind in ("id", "ood"):
            cells = {}
            for v in variants:
                sub = [dict(r, method=v, gamma=0.0) for r in rows if r["variant"] == v  # averaged over gamma
                       and r["method"] == method and r["kind"] == kind]
                cells.update({k: c for k, c in _cells([{x: y for x, y in r.items() if x != "ablation"}
                                                        for r in sub], None).items()})
            have = [v for v in variants if any(k[0] == v for k in cells)]
            if not have:
                continue
            gammas = sorted({float(r["gamma"]) for r in rows})
            a = grid(cells, have, [0.0], kind, "accuracy", 100)  # (P, T, V, 1)
            for i, v in enumerate(have):
                level = S.study_interval(a[:, :, i], seed=seed)[0]
                diff = S.study_interval(a[:, :, i] - a[:, :, 0], seed=seed)[0]
                out.append({"ablation": ablation, "variant": v, "method": method, "kind": kind,
                            "gammas": gammas, "level": level.as_dict(), "diff": diff.as_dict(),
                            "diff_vs": have[0]})
    return out


def ablation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`ablation_table` rows."""
    lines = ["| variant | method | test | accuracy (95% CI) | paired diff vs first variant (95% CI) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lv, d = r["level"], r["diff"]
        lines.append(f"| {r['variant']} | {_name(r['method'])} | {r['kind'].upper()} | {lv['estimate']:.2f} "
                     f"[{lv['ci_low']:.2f}, {lv['ci_high']:.2f}] | {d['estimate']:+.2f} [{d['ci_low']:+.2f}, "
                     f"{d['ci_high']:+.2f}] vs {r['diff_vs']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


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
            ax.bar(xs, ys, width=w, yerr=err, capsize=3, label=_name(m))
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
        ax.set_xlabel("pre-training noise ratio (%)")
        ax.set_ylabel(f"avg {kind.upper()} accuracy (%)")
        ax.set_title(f"{kind.upper()} ({method.upper()})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


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


# ----------------------------------------------------------------------------- the report file

STATISTICS = (
    "Each claim is decided from paired cells: LP, MLP and NMTune (and the noise ratios) are compared on the same "
    "pre-trained model, tuning seed and data split, and the same seeds are used at every noise ratio. The 95% "
    "interval is a hierarchical percentile bootstrap (4,000 replicates, seed 0; `examples/_stats.py`) that "
    "resamples pre-training seeds first, then tuning seeds within each, widened to Student's t interval over the "
    "per-pre-training-seed estimates wherever that is wider (with 3 pre-training seeds a percentile bootstrap "
    "cannot reach beyond the range of the three seed estimates and covers about 75%, not 95%; both parts are "
    "shown). Verdicts: **reproduced** (the interval "
    "excludes 0 in the paper's direction), **contradicted** (it excludes 0 the other way), inconclusive "
    "otherwise. Trend claims (monotone in noise) use Spearman's rank correlation between noise ratio and the "
    "metric, computed per pre-training seed (tuning seeds averaged first) and averaged.")


def _pct(g: float) -> str:
    return f"{100 * g:g}%"


def _table1(summary: Mapping[str, Any], gammas: Sequence[float]) -> list[str]:
    methods = [m for m in ("zeroshot", "lp", "mlp", "nmtune", "lora", "lora+nmtune") if m in summary]
    rows = ["| noise | method | ID acc | ID F1 | OOD acc | OOD F1 |", "|---|---|---|---|---|---|"]
    for g in gammas:
        for m in methods:
            cells = []
            for kind in ("id", "ood"):
                for key in ("accuracy", "macro_f1"):
                    mu, sd = summary[m].get(g, {}).get(kind, {}).get(key, (float("nan"), float("nan")))
                    cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f}")
            rows.append(f"| {_pct(g)} | {_name(m)} | " + " | ".join(cells) + " |")
    return rows


def _pretrain_rows(acc: Mapping[float, Mapping[int, float | None]]) -> list[str]:
    rows = ["| noise | val acc, mean ± std over pre-training seeds | per seed |", "|---|---|---|"]
    for g in sorted(acc):
        v = [x for x in acc[g].values() if x is not None]
        mu, sd = mean_std(100 * x for x in v)
        rows.append(f"| {_pct(g)} | {mu:.2f} ± {sd:.2f} | " + ", ".join(f"{100 * x:.2f}" for x in v) + " |")
    return rows


def _mean_backbone(backbone: Mapping[float, Mapping[int, Mapping[str, Any]]]) -> dict[float, dict[str, Any]]:
    out = {}
    for g, by in backbone.items():
        bs = list(by.values())
        b: dict[str, Any] = {k: float(np.mean([x[k] for x in bs])) for k in ("id_sve", "ood_lsvr")
                             if all(k in x for x in bs)}
        for k in ("id_points", "ood_points"):
            if all(k in x for x in bs):
                b[k] = [tuple(p) for x in bs for p in x[k]]
        out[g] = b
    return out


def _section(sec: Mapping[str, Any], out: Any, fig_dir: Any) -> tuple[list[str], list[dict[str, Any]], dict]:
    """Markdown lines, claims and figure paths of one regime."""
    import pathlib

    import _diagnosis as DG

    regime = sec["regime"]
    protocols = DG.by_protocol(sec["records"])
    primary = "selected" if "selected" in protocols else next(iter(protocols))
    records = protocols[primary]
    gammas = sorted({float(r["gamma"]) for r in records})
    full = max(float(r["fraction"]) for r in records)

    def decide(recs):
        return [dict(c, regime=regime, protocol=primary) for c in check_claims(
            recs, backbone=sec.get("backbone"), pretrain_accuracy=sec.get("pretrain_accuracy"))]

    claims = decide(records)
    if primary != "paper" and "paper" in protocols:
        claims = DG.merge_protocol_claims(claims, decide(protocols["paper"]))
    summary = summarize_records(records, fraction=full)
    figs = {f"{regime}_forest": plot_forest(claims, fig_dir / f"{regime}_forest.png", title=f"{regime} regime")}
    n = verdict_counts(claims)
    lines = [f"## {regime.capitalize()} regime", "",
             f"**{n['reproduced']} reproduced, {n['contradicted']} contradicted, {n['inconclusive']} inconclusive "
             f"of {len(claims)} claims** (downstream protocol: {primary}"
             + (", learning rates selected on a validation split carved from each task's training data; the paper "
                "recipe's verdict is shown beside each claim" if primary == "selected" else "") + ").", "",
             "### Claims", "", claims_markdown(claims), "", f"![forest](figures/{regime}_forest.png)", ""]
    lines += DG.diagnosis_lines(sec, claims, feature_dim=sec.get("feature_dim"),
                                tune_batch_size=int(sec.get("tune_batch_size") or 0))
    if sec.get("pretrain_accuracy"):
        lines += ["### Pre-training", "", *_pretrain_rows(sec["pretrain_accuracy"]), ""]
    if sec.get("pretrain_memorised"):
        lines += ["Memorisation at the end of pre-training:", "", *DG.memorisation_lines(sec["pretrain_memorised"]), ""]
    if sec.get("pretrain_curves"):
        fig = DG.plot_memorisation(sec["pretrain_curves"], fig_dir / f"{regime}_memorisation.png",
                                   title=f"{regime} pre-training")
        if fig:
            figs[f"{regime}_memorisation"] = fig
            lines += [f"![memorisation](figures/{regime}_memorisation.png)", ""]
    lines += [f"### Table 1 analogue ({primary} protocol; mean ± std over pre-training x tuning seeds, "
              f"{_pct(full)} of the data)", "", *_table1(summary, gammas), ""]
    if regime == "supervised":
        bb = _mean_backbone(sec.get("backbone") or {})
        figs["fig2"] = plot_noise_curves({full: summary}, fig_dir / "fig2_noise_vs_accuracy.png")
        figs["fig5"] = plot_method_comparison(summary, fig_dir / "fig5_methods.png")
        lines += ["### Figure 2 analogue: LP accuracy vs pre-training noise", "",
                  "![fig2](figures/fig2_noise_vs_accuracy.png)", "",
                  "### Figure 5 analogue: LP vs MLP vs NMTune", "", "![fig5](figures/fig5_methods.png)", ""]
        if bb and all("id_sve" in b and "ood_lsvr" in b for b in bb.values()):
            figs["fig3"] = plot_spectral_metrics(bb, fig_dir / "fig3_sve_lsvr.png")
            lines += ["### Figure 3 analogue: SVE (ID) and LSVR (OOD) of the frozen features (mean over "
                      "pre-training seeds)", "", "| noise | SVE (ID) | LSVR (OOD) |", "|---|---|---|",
                      *(f"| {_pct(g)} | {b['id_sve']:.4f} | {b['ood_lsvr']:.4f} |" for g, b in sorted(bb.items())),
                      "", "![fig3](figures/fig3_sve_lsvr.png)", ""]
        lines += _spectra_lines(sec, records, fig_dir, figs)
    for f in sec.get("figures", []):
        rel = os.path.relpath(f, out)
        lines += [f"![{pathlib.Path(f).stem}]({rel})", ""]
    lines += _ablation_lines(sec.get("ablation_records", []), fig_dir, figs)
    return lines, claims, figs


def _spectra_lines(sec, records, fig_dir, figs) -> list[str]:
    spectra = sec.get("spectra") or {}
    if not spectra:
        return []
    g0 = min(spectra)
    first_id = next((t for t in spectra[g0] if any(r["task"] == t and r["kind"] == "id" for r in records)), None)
    if first_id is None:
        return []
    figs["spectra_noise"] = plot_spectra({_pct(g): spectra[g][first_id]["backbone"] for g in sorted(spectra)},
                                         fig_dir / "spectra_backbone.png",
                                         title=f"pre-trained features, {first_id} test (first pre-training seed)")
    figs["spectra_methods"] = plot_spectra(
        {("LP (Z = F)" if m == "lp" else _name(m)): v for m, v in spectra[g0][first_id].items() if m != "backbone"},
        fig_dir / "spectra_methods.png", title=f"tuned features Z, {first_id} test, {_pct(g0)} noise")
    return ["Singular value spectra (rows L2-normalised):", "",
            "![spectra](figures/spectra_backbone.png) ![spectra](figures/spectra_methods.png)", ""]


def _ablation_lines(abl: Sequence[Mapping[str, Any]], fig_dir, figs) -> list[str]:
    names = list(dict.fromkeys(r["ablation"] for r in abl))
    if not names:
        return []
    lines = ["### Ablations", "", "Accuracy in points with its 95% interval (same bootstrap), and the paired "
             "difference to the first variant of the same method.", ""]
    titles = {"terms": "NMTune's terms removed and alone", "top_k": "top_k of L_SVD",
              "fractions": "downstream data fraction (Figure 5 analogue)",
              "label_noise": "noisy downstream labels on the ID tasks",
              "asymmetric": "asymmetric pre-training noise (only the classes shared with the OOD task)"}
    for name in names:
        rows = ablation_table(abl, name)
        if not rows:
            continue
        gs = ", ".join(_pct(g) for g in rows[0]["gammas"])
        figs[f"ablation_{name}"] = plot_ablation(rows, fig_dir / f"ablation_{name}.png", title=titles.get(name, name))
        lines += [f"#### {titles.get(name, name)} (pre-training noise {gs})", "", ablation_markdown(rows), "",
                  f"![{name}](figures/ablation_{name}.png)", ""]
    return lines


_PROSE = ("profile_notes", "pretrain_rule")


def _profile_lines(settings: Mapping[str, Any]) -> list[str]:
    """The run's profile; for a reduced one, what differs from the faithful profile; the pre-training rule."""
    notes = settings.get("profile_notes") or []
    rule = settings.get("pretrain_rule")
    return ([f"**Profile: {settings.get('profile', 'custom')}.** " + " ".join(notes), ""] if notes else []) + \
        ([rule, ""] if rule else [])


def write_report(out: Any, sections: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], *, command: str,
                 timing: Mapping[str, Any], language_table: Any = None) -> dict[str, Any]:
    """``report.md``, ``claims.json``, ``results.json`` and the figures of a study run.

    Args:
        out: the run folder.
        sections: one dict per regime: ``regime``, ``records``, optional ``backbone``
            (``{gamma: {pretrain_seed: {...}}}``), ``pretrain_accuracy``, ``ablation_records``,
            ``spectra``, ``figures``, ``pretrain``.
        settings: what was run (shown in the report).
        command: the command line.
        timing: ``{"wall": {stage: s}, "cpu": {stage: s}}``.
        language_table: a language ``table.md`` to include, if any.
    """
    import json
    import pathlib

    from _common import atomic_write_text, machine_info

    out = pathlib.Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    body, claims, figs = [], [], {}
    for sec in sections:
        lines, cl, fg = _section(sec, out, fig_dir)
        body += lines
        claims += cl
        figs.update(fg)
    wall, cpu = timing.get("wall", {}), timing.get("cpu", {})
    counts = {sec["regime"]: verdict_counts([c for c in claims if c["regime"] == sec["regime"]]) for sec in sections}
    head = ["# NMTune study: noisy pre-training, ID/OOD evaluation", "",
            f"- command: `{command}`", f"- machine: {machine_info()}",
            "- wall time (s) by stage, summed over calls: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items())
            + f"; total {sum(wall.values()):.0f}",
            "- CPU time (s, user + system) by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            + f"; total {sum(cpu.values()):.0f}",
            "- settings: " + "; ".join(f"{k} {v}" for k, v in settings.items() if k not in _PROSE), "",
            *_profile_lines(settings),
            "Verdicts: " + "; ".join(f"{r}: {c['reproduced']} reproduced, {c['contradicted']} contradicted, "
                                     f"{c['inconclusive']} inconclusive" for r, c in counts.items()) + ".", "",
            "How claims are decided: " + STATISTICS, ""]
    tail = []
    if language_table is not None and pathlib.Path(language_table).exists():
        lang = [("#" + ln if ln.startswith("#") else ln) for ln in pathlib.Path(language_table).read_text().splitlines()]
        tail = ["## Table 2 analogue: language (`examples/language.py`)", "", *lang[1:], ""]
    atomic_write_text(out / "report.md", "\n".join(head + body + tail) + "\n")
    atomic_write_text(out / "claims.json", json.dumps(claims, indent=1))
    result = {"settings": dict(settings), "claims": claims, "counts": counts, "command": command,
              "machine": machine_info(), "timing": dict(timing),
              "records": [r for sec in sections for r in sec["records"]],
              "ablation_records": [r for sec in sections for r in sec.get("ablation_records", [])],
              "pretrain_accuracy": {sec["regime"]: {str(g): {str(p): v for p, v in by.items()}
                                                    for g, by in (sec.get("pretrain_accuracy") or {}).items()}
                                    for sec in sections},
              "pretrain_memorised": {sec["regime"]: {str(g): {str(p): v for p, v in by.items()}
                                                     for g, by in (sec.get("pretrain_memorised") or {}).items()}
                                     for sec in sections if sec.get("pretrain_memorised")},
              "pretrain_curves": {sec["regime"]: {str(g): {str(p): v for p, v in by.items()}
                                                  for g, by in (sec.get("pretrain_curves") or {}).items()}
                                  for sec in sections if sec.get("pretrain_curves")},
              "backbone": {sec["regime"]: {str(g): {str(p): {k: v for k, v in b.items() if k != "per_test_set"}
                                                    for p, b in by.items()}
                                           for g, by in (sec.get("backbone") or {}).items()} for sec in sections},
              "figures": {k: os.path.relpath(v, out) for k, v in figs.items()}}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    return result
