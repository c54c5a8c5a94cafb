"""The report's markdown: tables and sections rendered from data the other modules computed.

Nothing here decides anything: claims come from :mod:`.claims`, statistics from
:mod:`.stats` and :mod:`.diagnosis`, summaries from :mod:`.records`.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from nmtune_study.common import mean_std
from nmtune_study.report import stats as S
from nmtune_study.report.claims import draw_decided, verdict_counts
from nmtune_study.report.diagnosis import (EARLY_LEARNING_BELOW, MEMORISED_BAR, ZEROSHOT_TARGET, memorisation_stats,
                                          recipe_stats, scale_stats)
from nmtune_study.report.records import method_name, primary_protocol, summarize_records

__all__ = ["ABLATION_TITLES", "SPECTRA_LINES", "STATISTICS", "ablation_lines", "ablation_markdown",
           "ablations_intro", "claims_markdown", "contrastive_tables", "diagnosis_lines", "fig2_fig5_lines",
           "fig3_lines", "figure_links", "language_section", "language_table", "mean_std_text",
           "memorisation_lines", "model_table", "pct", "pretrain_rows", "pretraining_lines", "profile_lines",
           "regime_head_lines", "report_head", "table1", "table1_lines"]

STATISTICS = (
    "Each claim is decided from paired cells: LP, MLP and NMTune (and the noise ratios) are compared on the same "
    "pre-trained model, tuning seed and data split, and the same seeds are used at every noise ratio. The 95% "
    "interval is a hierarchical percentile bootstrap (4,000 replicates, seed 0; `nmtune_study/report/stats.py`) that "
    "resamples pre-training seeds first, then tuning seeds within each, widened to Student's t interval over the "
    "per-pre-training-seed estimates wherever that is wider (with 3 pre-training seeds a percentile bootstrap "
    "cannot reach beyond the range of the three seed estimates and covers about 75%, not 95%; both parts are "
    "shown). Verdicts: **reproduced** (the interval "
    "excludes 0 in the paper's direction), **contradicted** (it excludes 0 the other way), inconclusive "
    "otherwise. Trend claims (monotone in noise) use Spearman's rank correlation between noise ratio and the "
    "metric, computed per pre-training seed (tuning seeds averaged first) and averaged.")


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


def ablation_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of :func:`ablation_table` rows."""
    lines = ["| variant | method | test | accuracy (95% CI) | paired diff vs first variant (95% CI) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lv, d = r["level"], r["diff"]
        lines.append(f"| {r['variant']} | {method_name(r['method'])} | {r['kind'].upper()} | {lv['estimate']:.2f} "
                     f"[{lv['ci_low']:.2f}, {lv['ci_high']:.2f}] | {d['estimate']:+.2f} [{d['ci_low']:+.2f}, "
                     f"{d['ci_high']:+.2f}] vs {r['diff_vs']} |")
    return "\n".join(lines)


def pct(g: float) -> str:
    return f"{100 * g:g}%"


def table1(summary: Mapping[str, Any], gammas: Sequence[float]) -> list[str]:
    methods = [m for m in ("zeroshot", "lp", "mlp", "nmtune", "lora", "lora+nmtune") if m in summary]
    rows = ["| noise | method | ID acc | ID F1 | OOD acc | OOD F1 |", "|---|---|---|---|---|---|"]
    for g in gammas:
        for m in methods:
            cells = []
            for kind in ("id", "ood"):
                for key in ("accuracy", "macro_f1"):
                    mu, sd = summary[m].get(g, {}).get(kind, {}).get(key, (float("nan"), float("nan")))
                    cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f}")
            rows.append(f"| {pct(g)} | {method_name(m)} | " + " | ".join(cells) + " |")
    return rows


def pretrain_rows(acc: Mapping[float, Mapping[int, float | None]]) -> list[str]:
    rows = ["| noise | val acc, mean ± std over pre-training seeds | per seed |", "|---|---|---|"]
    for g in sorted(acc):
        v = [x for x in acc[g].values() if x is not None]
        mu, sd = mean_std(100 * x for x in v)
        rows.append(f"| {pct(g)} | {mu:.2f} ± {sd:.2f} | " + ", ".join(f"{100 * x:.2f}" for x in v) + " |")
    return rows


_PROSE = ("profile_notes", "pretrain_rule")


def profile_lines(settings: Mapping[str, Any]) -> list[str]:
    """The run's profile; for a reduced one, what differs from the faithful profile; the pre-training rule."""
    notes = settings.get("profile_notes") or []
    rule = settings.get("pretrain_rule")
    return ([f"**Profile: {settings.get('profile', 'custom')}.** " + " ".join(notes), ""] if notes else []) + \
        ([rule, ""] if rule else [])


# ----------------------------------------------------------------------------- the study report


def report_head(*, command: str, machine: str, timing: Mapping[str, Any], settings: Mapping[str, Any],
                counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The top of ``report.md``: command, machine, time per stage, settings, profile, verdict counts."""
    wall, cpu = timing.get("wall", {}), timing.get("cpu", {})
    return ["# NMTune study: noisy pre-training, ID/OOD evaluation", "",
            f"- command: `{command}`", f"- machine: {machine}",
            "- wall time (s) by stage, summed over calls: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items())
            + f"; total {sum(wall.values()):.0f}",
            "- CPU time (s, user + system) by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            + f"; total {sum(cpu.values()):.0f}",
            "- settings: " + "; ".join(f"{k} {v}" for k, v in settings.items() if k not in _PROSE), "",
            *profile_lines(settings),
            "Verdicts: " + "; ".join(f"{r}: {c['reproduced']} reproduced, {c['contradicted']} contradicted, "
                                     f"{c['inconclusive']} inconclusive" for r, c in counts.items()) + ".", "",
            "How claims are decided: " + STATISTICS, ""]


def regime_head_lines(regime: str, claims: Sequence[Mapping[str, Any]], primary: str) -> list[str]:
    """A regime's heading, its verdict counts and its claims table with the forest plot."""
    n = verdict_counts(claims)
    return [f"## {regime.capitalize()} regime", "",
            f"**{n['reproduced']} reproduced, {n['contradicted']} contradicted, {n['inconclusive']} inconclusive "
            f"of {len(claims)} claims** (downstream protocol: {primary}"
            + (", learning rates selected on a validation split carved from each task's training data; the paper "
               "recipe's verdict is shown beside each claim" if primary == "selected" else "") + ").", "",
            "### Claims", "", claims_markdown(claims), "", f"![forest](figures/{regime}_forest.png)", ""]


def pretraining_lines(sec: Mapping[str, Any]) -> list[str]:
    """Pre-training accuracy per noise ratio and the memorisation at its end."""
    lines = []
    if sec.get("pretrain_accuracy"):
        lines += ["### Pre-training", "", *pretrain_rows(sec["pretrain_accuracy"]), ""]
    if sec.get("pretrain_memorised"):
        lines += ["Memorisation at the end of pre-training:", "", *memorisation_lines(sec["pretrain_memorised"]), ""]
    return lines


def table1_lines(summary: Mapping[str, Any], gammas: Sequence[float], primary: str, full: float) -> list[str]:
    return [f"### Table 1 analogue ({primary} protocol; mean ± std over pre-training x tuning seeds, "
            f"{pct(full)} of the data)", "", *table1(summary, gammas), ""]


def fig2_fig5_lines() -> list[str]:
    return ["### Figure 2 analogue: LP accuracy vs pre-training noise", "",
            "![fig2](figures/fig2_noise_vs_accuracy.png)", "",
            "### Figure 5 analogue: LP vs MLP vs NMTune", "", "![fig5](figures/fig5_methods.png)", ""]


def fig3_lines(backbone: Mapping[float, Mapping[str, Any]]) -> list[str]:
    """SVE (ID) and LSVR (OOD) of the frozen features by noise ratio (``backbone[gamma]`` means)."""
    return ["### Figure 3 analogue: SVE (ID) and LSVR (OOD) of the frozen features (mean over "
            "pre-training seeds)", "", "| noise | SVE (ID) | LSVR (OOD) |", "|---|---|---|",
            *(f"| {pct(g)} | {b['id_sve']:.4f} | {b['ood_lsvr']:.4f} |" for g, b in sorted(backbone.items())),
            "", "![fig3](figures/fig3_sve_lsvr.png)", ""]


SPECTRA_LINES = ["Singular value spectra (rows L2-normalised):", "",
                 "![spectra](figures/spectra_backbone.png) ![spectra](figures/spectra_methods.png)", ""]


def figure_links(figures: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[str]:
    """An image line per figure file, relative to the report's folder ``out``."""
    lines = []
    for f in figures:
        lines += [f"![{pathlib.Path(f).stem}]({os.path.relpath(f, out)})", ""]
    return lines


ABLATION_TITLES = {"terms": "NMTune's terms removed and alone", "top_k": "top_k of L_SVD",
                   "fractions": "downstream data fraction (Figure 5 analogue)",
                   "label_noise": "noisy downstream labels on the ID tasks",
                   "asymmetric": "asymmetric pre-training noise (only the classes shared with the OOD task)"}


def ablations_intro() -> list[str]:
    return ["### Ablations", "", "Accuracy in points with its 95% interval (same bootstrap), and the paired "
            "difference to the first variant of the same method.", ""]


def ablation_lines(name: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One ablation's subsection: title, noise ratios, table and figure."""
    gs = ", ".join(pct(g) for g in rows[0]["gammas"])
    return [f"#### {ABLATION_TITLES.get(name, name)} (pre-training noise {gs})", "", ablation_markdown(rows), "",
            f"![{name}](figures/ablation_{name}.png)", ""]


def language_section(table: str) -> list[str]:
    """The language study's ``table.md`` as the report's last section (its headings one level down)."""
    lang = [("#" + ln if ln.startswith("#") else ln) for ln in table.splitlines()]
    return ["## Table 2 analogue: language (`examples/language.py`)", "", *lang[1:], ""]


# ----------------------------------------------------------------------------- diagnosis


def memorisation_lines(memorised: Mapping[float, Mapping[int, float | None]]) -> list[str]:
    stats = memorisation_stats(memorised)
    if not stats:
        return []
    rows = ["| noise | memorised (flipped labels predicted as their noisy label), mean ± std | per seed |",
            "|---|---|---|"]
    rows += [f"| {100 * g:g}% | {s['mean']:.3f} ± {s['std']:.3f} | " + ", ".join(f"{v:.3f}" for v in s["per_seed"])
             + " |" for g, s in stats.items()]
    return rows


def _claim(claims: Sequence[Mapping[str, Any]], prefix: str) -> Mapping[str, Any] | None:
    return next((c for c in claims if c["claim"].startswith(prefix)), None)


def _fmt_ci(c: Mapping[str, Any], key: str = "") -> str:
    est, lo, hi = (c.get(f"{key}{k}") for k in ("estimate", "ci_low", "ci_high"))
    if est is None:
        return "-"
    return f"{est:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def diagnosis_lines(sec: Mapping[str, Any], claims: Sequence[Mapping[str, Any]], *, feature_dim: int | None,
                    tune_batch_size: int) -> list[str]:
    """The ``Diagnosis`` subsection of one regime: each suspect, its numbers, one line of
    conclusion; then the claims decided again (selected protocol) beside the paper recipe."""
    regime = sec["regime"]
    records = sec["records"]
    lines = [f"### Diagnosis ({regime} regime)", ""]
    lines += _memorisation_suspect(regime, sec.get("pretrain_memorised") or {})
    lines += _recipe_suspect(records, claims)
    lines += _backbone_suspect(regime, sec.get("pretrain_accuracy") or {}, sec.get("chance"))
    proto = claims[0].get("protocol", "selected") if claims else "selected"
    lines += _scale_suspect(scale_stats(records, proto) or scale_stats(records, "paper"))
    if feature_dim:
        lines += [f"- **Width against rows.** Frozen features have D = {feature_dim}; tuning batches have up to "
                  f"{tune_batch_size} rows, so the covariance and spectrum of a batch have rank at most "
                  f"{min(feature_dim, tune_batch_size)}"
                  + (" (M < D: the batch cannot span the feature space)" if tune_batch_size < feature_dim else "")
                  + "."]
    decided = draw_decided(claims)
    lines += ["", f"Claims still decided by the pre-training draw (per-seed estimates of both signs): "
              + ("; ".join(decided) if decided else "none") + ".", ""]
    return lines


def _memorisation_suspect(regime: str, memorised: Mapping[float, Mapping[int, float | None]]) -> list[str]:
    mem = memorisation_stats(memorised)
    if not mem:
        return []
    g_max = max(mem)
    m = mem[g_max]
    unit = ("flipped labels predicted as their noisy label" if regime == "supervised" else
            "swapped pairs whose top-ranked training caption is the swapped-in one")
    if m["mean"] >= MEMORISED_BAR:
        verdict = "memorised (the paper's regime)"
    elif m["mean"] >= EARLY_LEARNING_BELOW:
        verdict = f"partly memorised (below the bar, above the {EARLY_LEARNING_BELOW} of the early-learning phase)"
    else:
        verdict = "not memorised: early-learning regime"
    return [f"- **Memorisation.** At {100 * g_max:g}% noise the models memorised {m['mean']:.3f} ± "
            f"{m['std']:.3f} of their {unit} (bar {MEMORISED_BAR}; per noise ratio: "
            + ", ".join(f"{100 * g:g}% {s['mean']:.3f}" for g, s in mem.items()) + f"). Conclusion: {verdict}."]


def _recipe_suspect(records: Sequence[Mapping[str, Any]], claims: Sequence[Mapping[str, Any]]) -> list[str]:
    rs = recipe_stats(records)
    if not rs:
        return []
    parts = []
    for proto, by_m in rs.items():
        parts.append(f"{proto}: " + "; ".join(
            f"{m} loss {v['train_loss']:.3f}, lr " + ", ".join(f"{lr:g}×{n}" for lr, n in v["lr_counts"].items())
            for m, v in by_m.items()))
    id_claim = _claim(claims, "NMTune beats LP and MLP tuning on ID accuracy")
    margin = ""
    if id_claim is not None:
        margin = (f" NMTune's ID margin over the better baseline: selected {_fmt_ci(id_claim)}, paper recipe "
                  f"{_fmt_ci(id_claim, 'paper_')} points.")
    moved = [c["claim"] for c in claims if c.get("paper_verdict") not in (None, c["verdict"])]
    concl = (f"the recipe changes {len(moved)} verdict(s)" if moved else
             "the recipe changes no verdict")
    return ["- **Recipes.** Final training loss and learning rates used (fits counted once): "
            + " | ".join(parts) + "." + margin + f" Conclusion: {concl}."]


def _backbone_suspect(regime: str, acc: Mapping[float, Mapping[int, float | None]], chance: float | None
                      ) -> list[str]:
    clean = [v for v in (acc.get(0.0) or {}).values() if v is not None]
    if not clean:
        return []
    what = "zero-shot accuracy on the clean validation split" if regime == "contrastive" else \
        "accuracy on the clean validation split"
    value = float(np.mean(clean))
    target = ""
    if regime == "contrastive":
        met = "met" if value >= ZEROSHOT_TARGET else "not met"
        target = (f" Target {100 * ZEROSHOT_TARGET:g} % (3.5x the 0.2 study's 7.1 %): {met}; a backbone this far "
                  "above chance has learned features, so the regime no longer tests a near-random network.")
    return [f"- **Backbone.** Clean model's {what}: {100 * value:.2f} %"
            + (f" (chance {100 * chance:.2f} %)" if chance else "") + "." + target]


def _scale_suspect(sc: Mapping[str, Any]) -> list[str]:
    if not sc:
        return []
    names = ("consistency", "covariance", "singular_value")

    def terms(when: str) -> str:
        v = sc[when]
        parts = []
        for t in (t for t in names if f"{t}/weighted" in v):
            q25, med, q75 = v[f"{t}/weighted"]
            parts.append(f"{t} {med:+.2e} [{q25:+.2e}, {q75:+.2e}] ({v[f'{t}/unweighted'][1]:+.2f} unweighted)")
        return ", ".join(parts)

    biggest = max(abs(sc["last"][f"{t}/weighted"][1]) for t in names if f"{t}/weighted" in sc["last"])
    concl = ("the regularisers are a small perturbation of the task loss (< 5 % of it)" if biggest < 0.05
             else "the regularisers are a sizeable part of the objective")
    return [f"- **Regulariser scale** (weighted term / task loss, median [interquartile range] over "
            f"{sc['fits']} NMTune fits; a mean would be dominated by the fits whose task loss ends near zero): "
            f"first epoch {terms('first')}; last epoch {terms('last')}. Conclusion: {concl}."]


def model_table(records: Sequence[dict[str, Any]], *, title: str = "") -> str:
    """Per-task and averaged table (mean ± std over seeds, full data fraction; the ``selected``
    protocol's records when there are several protocols)."""
    _, records = primary_protocol(records)
    full = max(float(r["fraction"]) for r in records)
    lines = [f"### {title}" if title else "", "",
             "| method | task | test set | accuracy (%) | macro-F1 (%) | SVE | LSVR |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in records:
        if math.isclose(float(r["fraction"]), full):
            groups.setdefault((r["method"], r["task"], r["domain"]), []).append(r)
    for (m, t, d), rows in sorted(groups.items()):
        cells = []
        for key, scale in (("accuracy", 100), ("macro_f1", 100), ("sve", 1), ("lsvr", 1)):
            mu, sd = mean_std(scale * r[key] for r in rows)
            cells.append(f"{mu:.2f} ± {sd:.2f}" if scale == 100 else f"{mu:.3f} ± {sd:.3f}")
        lines.append(f"| {m} | {t} | {d} | " + " | ".join(cells) + " |")
    summ = summarize_records(records, fraction=full)
    lines += ["", "| method | ID acc | ID F1 | OOD acc | OOD F1 |", "|---|---|---|---|---|"]
    for m, by_g in summ.items():
        for _g, kinds in by_g.items():
            cells = []
            for kind in ("id", "ood"):
                for key in ("accuracy", "macro_f1"):
                    mu, sd = kinds.get(kind, {}).get(key, (float("nan"), float("nan")))
                    cells.append(f"{100 * mu:.2f} ± {100 * sd:.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_last(runs: Sequence[dict[str, Any]], key: str) -> str:
    """Mean over runs of the last value of a per-epoch curve (``-`` when a run has none)."""
    last = [c[key][-1] for c in runs if c.get(key) and c[key][-1] is not None]
    return f"{sum(last) / len(last):.3f}" if len(last) == len(runs) and not any(math.isnan(v) for v in last) else "-"


def contrastive_tables(records: Sequence[Mapping[str, Any]], backbone: Mapping[float, Mapping[str, Any]],
                       curves: Mapping[str, Mapping[str, Any]], timing: Mapping[str, float], *,
                       methods: Sequence[str]) -> str:
    """The contrastive regime's ``results.md``: ID/OOD accuracy and macro-F1 by gamma and method
    (mean ± std over pre-training x tuning seeds), SVE/LSVR of the frozen features by gamma,
    pre-training summary."""
    protocol, selected = primary_protocol(records)
    summary = summarize_records(selected)  # std over every pre-trained x tuned model
    gammas = sorted({float(r["gamma"]) for r in records})
    lines = [f"## Downstream accuracy ({protocol} protocol; mean ± std over pre-training x tuning seeds; "
             "zero-shot: over pre-training seeds)", "", "| swapped | method | ID acc | ID F1 | OOD acc | OOD F1 |",
             "|---|---|---|---|---|---|"]
    for g in gammas:
        for m in methods:
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




_METRIC_NAMES = {"accuracy": "macro-F1", "matthews": "MCC", "f1": "F1", "pearson_spearman": "Pearson/Spearman"}


def mean_std_text(agg: dict[str, dict[str, float]], key: str, digits: int = 2) -> str:
    if key not in agg:
        return "—"
    return f"{agg[key]['mean']:.{digits}f} ± {agg[key]['std']:.{digits}f}"


def _comparison_lines(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    names = {"id_acc": "ID accuracy", "ood_acc": "OOD accuracy", "id_score": "ID task score",
             "ood_score": "OOD task score"}
    lines = ["| task | comparison | NMTune minus baseline (points) | 95% CI over tuning seeds (t) | "
             "test-set paired SE | combined 95% CI | verdict (paper: NMTune better) |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        se = f"±{c['test_se']:.2f}" if c["test_se"] is not None else "-"
        lines.append(f"| {c['task']} | {names.get(c['key'], c['key'])} vs {method_name(c['vs'])} | "
                     f"{c['estimate']:+.2f} | [{c['seed_low']:+.2f}, {c['seed_high']:+.2f}] | {se} | "
                     f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] | {c['verdict']} |")
    return lines


def language_table(results: dict[str, Any]) -> str:
    """The markdown report (Table 2 analogue) of a :func:`run_study` result."""
    lines = ["# NMTune on a frozen text encoder (Table 2 protocol)", ""]
    meta = results["meta"]
    lines += [
        f"- command: `{meta['command']}`",
        f"- encoder: `{meta['encoder']}`; tasks: {', '.join(meta['tasks'])}",
        f"- recipe: {meta['recipe']}",
        f"- seeds: {meta['seeds']}; mean ± std (sample std) over seeds; metrics in percent",
        f"- machine: {meta['machine']}",
        f"- wall time: {meta['wall_seconds']:.1f} s (encoding {meta['encode_seconds']:.1f} s, "
        f"{meta['texts_encoded']} texts encoded, "
        + (f"{meta['encode_throughput']:.1f} texts/s" if meta["encode_throughput"] else "all from cache")
        + f"; tuning {meta['tune_seconds']:.1f} s)",
        "",
    ]
    for tname, tres in results["tasks"].items():
        metric = tres["metric"]
        mname = _METRIC_NAMES[metric]
        lines += [f"## {tname}: {tres['description']}", ""]
        lines += [
            f"| Method | ID acc | ID {mname} | OOD acc | OOD {mname} | SVE (ID Z) | LSVR (OOD Z) |",
            "|---|---|---|---|---|---|---|",
        ]
        score_key = "macro_f1" if metric == "accuracy" else "score"
        for m, agg in tres["methods"].items():
            lines.append(
                f"| {method_name(m)} | {mean_std_text(agg, 'id_acc')} | {mean_std_text(agg, 'id_' + score_key)} | "
                f"{mean_std_text(agg, 'ood_acc')} | {mean_std_text(agg, 'ood_' + score_key)} | {mean_std_text(agg, 'id_sve', 3)} | "
                f"{mean_std_text(agg, 'ood_lsvr', 3)} |"
            )
        f = tres["frozen_features"]
        lines.append(
            f"| frozen F (reference) | | | | | {f['id']['sve']:.3f} | "
            + (f"{f['ood']['lsvr']:.3f} |" if f.get("ood") else "— |")
        )
        lines.append("")
        if tres.get("ood_sets"):
            lines.append(f"OOD sets: {', '.join(f'{k} ({v} texts)' for k, v in tres['ood_sets'].items())}; "
                         f"train {tres['n_train']}, ID test {tres['n_id_test']} texts, {tres['num_classes']} classes.")
            lines.append("")
    if len(results["tasks"]) > 1:
        lines += ["## Average over tasks (task scores: GLUE metric, accuracy where it is the metric)", "",
                  "| Method | ID score | OOD score |", "|---|---|---|"]
        for m, agg in results["average"].items():
            lines.append(f"| {method_name(m)} | {mean_std_text(agg, 'id_score')} | {mean_std_text(agg, 'ood_score')} |")
        lines.append("")
    lines += ["## NMTune against LP and MLP, paired by tuning seed", "",
              "Each difference is paired (same tuning seed, same test items). The interval over tuning seeds is "
              "Student's t (`nmtune_study/report/stats.py`); the test-set sampling error of a paired difference is "
              "std(correct_a - correct_b) / sqrt(n) over the test items (only discordant items count, as in "
              "McNemar's test), averaged over seeds; the combined interval adds the two in quadrature. "
              "Verdict: reproduced / contradicted when the combined interval excludes 0, else inconclusive.", ""]
    lines += _comparison_lines(results.get("comparisons", []))
    lines += [""] + _test_noise(results)
    lines.append("")
    return "\n".join(lines)


def _test_noise(results: dict[str, Any]) -> list[str]:
    """A line on the test sets' sampling noise, which the seed std does not include."""
    out = []
    for tname, tres in results["tasks"].items():
        lp = tres["methods"].get("lp") or next(iter(tres["methods"].values()))
        parts = []
        for key, n in (("id_acc", tres["n_id_test"]), ("ood_acc", sum(tres["ood_sets"].values()))):
            if key in lp and n:
                parts.append(f"{key[:-4].upper()} ±{100 * S.binomial_se(lp[key]['mean'] / 100, n):.2f} (n={n})")
        if parts:
            out.append(f"- {tname}: binomial standard error of one accuracy at the LP level: {', '.join(parts)} "
                       "points (unpaired: one method's accuracy, not a paired difference).")
    return out
