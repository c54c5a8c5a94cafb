"""One run's report files: ``report.md``, ``claims.json``, ``results.json`` and ``figures/``.

:func:`write_report` decides each regime's claims (:mod:`.claims`), draws its figures
(:mod:`.plots`), renders its sections (:mod:`.markdown`) and writes the files.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from nmtune_study.common import atomic_write_text, machine_info
from nmtune_study.report import markdown as M
from nmtune_study.report import plots as P
from nmtune_study.report.claims import ablation_table, section_claims, verdict_counts
from nmtune_study.report.records import method_name, summarize_records

__all__ = ["write_report"]


def _mean_backbone(backbone: Mapping[float, Mapping[int, Mapping[str, Any]]]) -> dict[float, dict[str, Any]]:
    """``{gamma: {"id_sve", "ood_lsvr": mean over pre-training seeds, "id_points", "ood_points": all seeds'}}``."""
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


def _section(sec: Mapping[str, Any], out: pathlib.Path, fig_dir: pathlib.Path
             ) -> tuple[list[str], list[dict[str, Any]], dict[str, str]]:
    """Markdown lines, claims and figure paths of one regime."""
    regime = sec["regime"]
    primary, records, claims = section_claims(sec)
    gammas = sorted({float(r["gamma"]) for r in records})
    full = max(float(r["fraction"]) for r in records)
    summary = summarize_records(records, fraction=full)
    figs = {f"{regime}_forest": P.plot_forest(claims, fig_dir / f"{regime}_forest.png", title=f"{regime} regime")}
    lines = M.regime_head_lines(regime, claims, primary)
    lines += M.diagnosis_lines(sec, claims, feature_dim=sec.get("feature_dim"),
                               tune_batch_size=int(sec.get("tune_batch_size") or 0))
    lines += M.pretraining_lines(sec)
    if sec.get("pretrain_curves"):
        fig = P.plot_memorisation(sec["pretrain_curves"], fig_dir / f"{regime}_memorisation.png",
                                  title=f"{regime} pre-training")
        if fig:
            figs[f"{regime}_memorisation"] = fig
            lines += [f"![memorisation](figures/{regime}_memorisation.png)", ""]
    lines += M.table1_lines(summary, gammas, primary, full)
    if regime == "supervised":
        lines += _supervised_figures(sec, records, summary, full, fig_dir, figs)
    lines += M.figure_links(sec.get("figures", []), out)
    lines += _ablation_lines(sec.get("ablation_records", []), fig_dir, figs)
    return lines, claims, figs


def _supervised_figures(sec, records, summary, full: float, fig_dir: pathlib.Path, figs: dict[str, str]) -> list[str]:
    """Figures 2, 5 and 3 and the spectra of the supervised regime (into ``figs``), with their lines."""
    figs["fig2"] = P.plot_noise_curves({full: summary}, fig_dir / "fig2_noise_vs_accuracy.png")
    figs["fig5"] = P.plot_method_comparison(summary, fig_dir / "fig5_methods.png")
    lines = M.fig2_fig5_lines()
    bb = _mean_backbone(sec.get("backbone") or {})
    if bb and all("id_sve" in b and "ood_lsvr" in b for b in bb.values()):
        figs["fig3"] = P.plot_spectral_metrics(bb, fig_dir / "fig3_sve_lsvr.png")
        lines += M.fig3_lines(bb)
    return lines + _spectra_lines(sec, records, fig_dir, figs)


def _spectra_lines(sec, records, fig_dir: pathlib.Path, figs: dict[str, str]) -> list[str]:
    spectra = sec.get("spectra") or {}
    if not spectra:
        return []
    g0 = min(spectra)
    first_id = next((t for t in spectra[g0] if any(r["task"] == t and r["kind"] == "id" for r in records)), None)
    if first_id is None:
        return []
    figs["spectra_noise"] = P.plot_spectra({M.pct(g): spectra[g][first_id]["backbone"] for g in sorted(spectra)},
                                           fig_dir / "spectra_backbone.png",
                                           title=f"pre-trained features, {first_id} test (first pre-training seed)")
    figs["spectra_methods"] = P.plot_spectra(
        {("LP (Z = F)" if m == "lp" else method_name(m)): v for m, v in spectra[g0][first_id].items()
         if m != "backbone"},
        fig_dir / "spectra_methods.png", title=f"tuned features Z, {first_id} test, {M.pct(g0)} noise")
    return M.SPECTRA_LINES


def _ablation_lines(abl: Sequence[Mapping[str, Any]], fig_dir: pathlib.Path, figs: dict[str, str]) -> list[str]:
    names = list(dict.fromkeys(r["ablation"] for r in abl))
    if not names:
        return []
    lines = M.ablations_intro()
    for name in names:
        rows = ablation_table(abl, name)
        if not rows:
            continue
        figs[f"ablation_{name}"] = P.plot_ablation(rows, fig_dir / f"ablation_{name}.png",
                                                   title=M.ABLATION_TITLES.get(name, name))
        lines += M.ablation_lines(name, rows)
    return lines


def write_report(out: str | os.PathLike, sections: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], *,
                 command: str, timing: Mapping[str, Any], language_table: str | os.PathLike | None = None
                 ) -> dict[str, Any]:
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

    Returns:
        What ``results.json`` holds.
    """
    out = pathlib.Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    body, claims, figs = [], [], {}
    for sec in sections:
        lines, cl, fg = _section(sec, out, fig_dir)
        body += lines
        claims += cl
        figs.update(fg)
    counts = {sec["regime"]: verdict_counts([c for c in claims if c["regime"] == sec["regime"]]) for sec in sections}
    head = M.report_head(command=command, machine=machine_info(), timing=timing, settings=settings, counts=counts)
    tail = []
    if language_table is not None and pathlib.Path(language_table).exists():
        tail = M.language_section(pathlib.Path(language_table).read_text())
    atomic_write_text(out / "report.md", "\n".join(head + body + tail) + "\n")
    atomic_write_text(out / "claims.json", json.dumps(claims, indent=1))
    result = _results(out, sections, settings, claims, counts, command, timing, figs)
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    return result


def _by_regime(sections: Sequence[Mapping[str, Any]], key: str, *, present_only: bool = False) -> dict[str, Any]:
    """``{regime: {str(gamma): {str(pretrain_seed): value}}}`` of one per-seed section entry."""
    return {sec["regime"]: {str(g): {str(p): v for p, v in by.items()} for g, by in (sec.get(key) or {}).items()}
            for sec in sections if sec.get(key) or not present_only}


def _results(out: pathlib.Path, sections, settings, claims, counts, command: str, timing, figs) -> dict[str, Any]:
    """``results.json``: the settings, claims and every record of the run, as numbers."""
    return {"settings": dict(settings), "claims": claims, "counts": counts, "command": command,
            "machine": machine_info(), "timing": dict(timing),
            "records": [r for sec in sections for r in sec["records"]],
            "ablation_records": [r for sec in sections for r in sec.get("ablation_records", [])],
            "pretrain_accuracy": _by_regime(sections, "pretrain_accuracy"),
            "pretrain_memorised": _by_regime(sections, "pretrain_memorised", present_only=True),
            "pretrain_curves": _by_regime(sections, "pretrain_curves", present_only=True),
            "backbone": {sec["regime"]: {str(g): {str(p): {k: v for k, v in b.items() if k != "per_test_set"}
                                                  for p, b in by.items()}
                                         for g, by in (sec.get("backbone") or {}).items()} for sec in sections},
            "figures": {k: os.path.relpath(v, out) for k, v in figs.items()}}
