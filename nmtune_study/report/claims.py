"""The paper's claims decided from records: pure functions that return data.

Each claim is decided by :mod:`.stats` from *paired* cells (:func:`.records.paired_cells`):
differences are taken cell by cell (same pre-trained model, tuning seed and data split)
and the interval is a hierarchical bootstrap (pre-training seeds first), widened to the
t interval over pre-training seeds where that is wider. The same paired logic gives the
ablation tables (:func:`ablation_table`) and the language study's comparisons
(:func:`seed_paired_comparisons`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from nmtune_study.report import stats as S
from nmtune_study.report.records import by_protocol, grid, method_name, paired_cells, primary_protocol

__all__ = ["ablation_table", "check_claims", "draw_decided", "merge_protocol_claims", "section_claims",
           "seed_paired_comparisons", "verdict_counts"]


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
    tag = method_name(base)
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
               "argmax over gamma: " + ", ".join(f"{method_name(m)} {100 * gammas[int(np.argmax(peak[i]))]:g}%"
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
                   "clean minus noisy OOD F1: " + ", ".join(f"{method_name(m)} {gaps[i, 0] - gaps[i, 1]:+.2f}"
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
    cells = paired_cells(records, fraction)
    gammas = sorted({k[1] for k in cells})
    claims: list[dict[str, Any]] = []
    _noise_claims(claims, cells, gammas, base_method, seed)
    _trend_claims(claims, backbone or {}, pretrain_accuracy or {}, gammas, seed)
    _method_claims(claims, cells, gammas, seed)
    _zeroshot_claims(claims, cells, gammas, seed)
    return claims


def section_claims(sec: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]], list[dict[str, Any]]]:
    """One regime's claims (``sec`` as :func:`nmtune_study.report.assemble.write_report` takes it),
    decided on the primary protocol's records (``selected`` where the run has it), each with the
    paper recipe's verdict beside it.

    Returns:
        ``(primary protocol, its records, claims)``; each claim names its ``regime`` and ``protocol``.
    """
    regime = sec["regime"]
    protocols = by_protocol(sec["records"])
    primary, records = primary_protocol(sec["records"])

    def decide(recs):
        return [dict(c, regime=regime, protocol=primary) for c in check_claims(
            recs, backbone=sec.get("backbone"), pretrain_accuracy=sec.get("pretrain_accuracy"))]

    claims = decide(records)
    if primary != "paper" and "paper" in protocols:
        claims = merge_protocol_claims(claims, decide(protocols["paper"]))
    return primary, records, claims


def verdict_counts(claims: Sequence[Mapping[str, Any]], key: str = "verdict") -> dict[str, int]:
    """``{"reproduced": n, "contradicted": n, "inconclusive": n}``.

    Example:
        >>> verdict_counts([{"verdict": "reproduced"}])
        {'reproduced': 1, 'contradicted': 0, 'inconclusive': 0}
    """
    return {v: sum(c.get(key) == v for c in claims) for v in S.VERDICTS}


def merge_protocol_claims(primary: Sequence[dict[str, Any]], paper: Sequence[Mapping[str, Any]] | None
                          ) -> list[dict[str, Any]]:
    """The primary protocol's claims, each with the paper recipe's verdict beside it
    (``paper_verdict``, ``paper_estimate``, ``paper_ci_low``, ``paper_ci_high``)."""
    other = {c["claim"]: c for c in paper or []}
    out = []
    for c in primary:
        p = other.get(c["claim"])
        extra = {} if p is None else {"paper_verdict": p["verdict"], "paper_estimate": p["estimate"],
                                      "paper_ci_low": p["ci_low"], "paper_ci_high": p["ci_high"]}
        out.append(dict(c, **extra))
    return out


def draw_decided(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """Claims still decided by the pre-training draw: their per-pre-training-seed estimates
    disagree in sign, so which models were drawn decides the direction."""
    out = []
    for c in claims:
        per = [v for v in (c.get("per_pretrain_seed") or []) if v is not None and math.isfinite(v)]
        if per and min(per) < 0 < max(per):
            out.append(c["claim"])
    return out


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
                cells.update({k: c for k, c in paired_cells([{x: y for x, y in r.items() if x != "ablation"}
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


def seed_paired_comparisons(task: str, per_seed: Mapping[str, Sequence[Mapping[str, Any]]],
                            correct: Mapping[str, Sequence[Mapping[str, Any]]], key: str) -> list[dict[str, Any]]:
    """NMTune minus LP / MLP on one summary number, paired by tuning seed: the t interval
    over tuning seeds, the paired test-set standard error (same test items, per-item
    correctness; mean over seeds) and the two combined (``sqrt(h_seed^2 + (1.96 se)^2)``)."""
    out = []
    if "nmtune" not in per_seed or key not in per_seed["nmtune"][0]["summary"]:
        return out
    split = "id" if key.startswith("id_") else "ood"
    for base in ("lp", "mlp"):
        if base not in per_seed:
            continue
        diffs = [a["summary"][key] - b["summary"][key] for a, b in zip(per_seed["nmtune"], per_seed[base])]
        seed_ci = S.t_interval(diffs)
        se = None
        if key.endswith("_acc"):
            ses = [S.paired_test_se(a[split], b[split]) for a, b in zip(correct["nmtune"], correct[base])]
            se = 100 * float(np.mean(ses))
        half_seed = (seed_ci.high - seed_ci.low) / 2
        half = float(np.sqrt(half_seed ** 2 + (1.96 * (se or 0.0)) ** 2))
        lo, hi = seed_ci.estimate - half, seed_ci.estimate + half
        out.append({"task": task, "key": key, "vs": base, "estimate": seed_ci.estimate, "seed_low": seed_ci.low,
                    "seed_high": seed_ci.high, "test_se": se, "ci_low": lo, "ci_high": hi,
                    "n_tune": len(diffs), "verdict": S.verdict(lo, hi, +1)})
    return out
