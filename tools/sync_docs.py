"""Render the figures the docs quote from a run into the docs, from the committed result files.

Every figure in README.md, docs/*.md, examples/README.md and benchmarks/README.md that
comes from a run (study verdicts and estimates, accuracies, the language table, benchmark
ratios, run times) sits between two markers::

    <!-- generated:NAME -->...<!-- /generated:NAME -->

and is written here from the result file it comes from:

* ``examples/results/claims.json`` (and ``results.json``, ``timing.json``): the study;
* ``examples/results/contrastive/results.md`` and ``records.json``: the contrastive regime;
* ``examples/results/language/results.json``: the language study;
* ``examples/results/seed_stability.md``: the seed-stability comparison;
* ``benchmarks/RESULTS.md``: the benchmark tables (the last recorded run of each script).

When a result file is replaced by a new run, one ``python tools/sync_docs.py`` rewrites
every block. ``--check`` rewrites nothing and exits 1 naming each block whose text differs
from what the result files give (``tests/test_docs_truth.py`` runs it). Renderers read the
keys they need and ignore any other, so a result file that gains keys renders the same.

Usage::

    python tools/sync_docs.py            # rewrite the blocks in place
    python tools/sync_docs.py --check    # exit 1 if a block is stale
    python tools/sync_docs.py --root DIR # another checkout (the tests use a copy)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

__all__ = ["RENDERERS", "Results", "blocks", "doc_files", "main", "render_all", "sync"]

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- generated:(?P<name>[a-z0-9-]+) -->(?P<body>.*?)<!-- /generated:(?P=name) -->", re.S)
OPEN = re.compile(r"<!-- /?generated:([a-z0-9-]+) -->")
MINUS = "\u2212"


def doc_files(root: Path) -> list[Path]:
    """The markdown files whose blocks are kept in sync."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "examples" / "README.md",
            root / "benchmarks" / "README.md"]



# ----------------------------------------------------------------------------------------------
# reading the result files


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table of ``text``, each as rows keyed by the header cells."""
    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|\s*:?-{3,}", lines[i + 1]):
            header = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = _cells(lines[i])
                if len(cells) > len(header):  # a '|' inside the first cell (a claim's text)
                    extra = len(cells) - len(header)
                    cells = ["|".join(cells[: extra + 1])] + cells[extra + 1 :]
                rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def section(text: str, heading: str) -> str:
    """The body of the ``## `` section whose heading starts with ``heading``."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise KeyError(f"no section '## {heading}...'")
    return match.group(1)


def table_with(text: str, *columns: str) -> list[dict[str, str]]:
    """The first table of ``text`` that has every one of ``columns``."""
    for rows in markdown_tables(text):
        if rows and all(c in rows[0] for c in columns):
            return rows
    raise KeyError(f"no table with columns {columns}")


class Results:
    """The committed result files of a checkout, read once each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def _get(self, key: str, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def json(self, rel: str) -> Any:
        return self._get(rel, lambda: json.loads((self.root / rel).read_text()))

    def text(self, rel: str) -> str:
        return self._get(rel, lambda: (self.root / rel).read_text())

    def claims(self, regime: str) -> list[dict[str, Any]]:
        return [c for c in self.json("examples/results/claims.json") if c.get("regime", "supervised") == regime]

    def claim(self, regime: str, prefix: str) -> dict[str, Any] | None:
        return next((c for c in self.claims(regime) if c["claim"].startswith(prefix)), None)

    def timing(self) -> dict[str, dict[str, float]]:
        return self.json("examples/results/timing.json")

    def settings(self) -> dict[str, Any]:
        return self.json("examples/results/results.json").get("settings", {})

    def contrastive_md(self) -> str:
        return self.text("examples/results/contrastive/results.md")

    def contrastive_records(self) -> dict[str, Any]:
        return self.json("examples/results/contrastive/records.json")

    def language(self) -> dict[str, Any]:
        return self.json("examples/results/language/results.json")

    def bench(self) -> str:
        return self.text("benchmarks/RESULTS.md")


# ----------------------------------------------------------------------------------------------
# formatting


def num(x: float, digits: int = 2, *, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals, a true minus sign, and ``+`` when ``sign``."""
    s = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    if s.lstrip("+-").strip("0.") == "":  # -0.00 -> 0.00
        s = s.replace("-", "+" if sign else "")
    return s.replace("-", MINUS)


def ratio(x: str | float) -> str:
    """A cost ratio as recorded (``"0.155"``), rounded half up to two significant digits below 1 and two
    decimals above: 0.27x, 0.16x, 0.072x, 0.0097x, 1.69x."""
    d = Decimal(str(x))
    if d >= 1:
        q = Decimal("0.01")
    else:
        q = Decimal(1).scaleb(min(d.adjusted() - 1, -2))
    return f"{d.quantize(q, rounding=ROUND_HALF_UP)}×"


def _digits(unit: str) -> int:
    return 3 if unit == "nats" else 2


def claim_figure(c: dict[str, Any]) -> str:
    d = _digits(c.get("unit", "points"))
    unit = {"points": " points", "nats": " nats", "rho": ""}.get(c.get("unit", ""), f" {c.get('unit', '')}")
    rho = "ρ " if c.get("unit") == "rho" else ""
    return f"{rho}{num(c['estimate'], d, sign=True)}{unit}, 95 % CI [{num(c['ci_low'], d, sign=True)}, " \
           f"{num(c['ci_high'], d, sign=True)}]"


def counts(claims: Iterable[dict[str, Any]]) -> dict[str, int]:
    out = {"reproduced": 0, "contradicted": 0, "inconclusive": 0}
    for c in claims:
        out[c["verdict"]] = out.get(c["verdict"], 0) + 1
    return out


def count_text(claims: list[dict[str, Any]]) -> str:
    n = counts(claims)
    return f"{n['reproduced']} reproduced, {n['contradicted']} contradicted, {n['inconclusive']} inconclusive " \
           f"of {len(claims)} claims"


def sci(x: float) -> str:
    """``5e-9``, not ``5e-09``."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def pct(x: float) -> str:
    return f"{x * 100:g} %"


# ----------------------------------------------------------------------------------------------
# renderers: one per block name, each returns the block's text


def _verdict_lists(claims: list[dict[str, Any]]) -> str:
    parts = []
    for verdict, label in (("reproduced", "Reproduced"), ("contradicted", "**Contradicted**")):
        chosen = [c for c in claims if c["verdict"] == verdict]
        if chosen:
            parts.append(f"{label}: " + "; ".join(f"{c['claim']} ({claim_figure(c)})" for c in chosen) + ".")
    rest = [c for c in claims if c["verdict"] == "inconclusive"]
    if rest:
        parts.append("Inconclusive: " + "; ".join(f"{c['claim']} ({claim_figure(c)})" for c in rest) + ".")
    return " ".join(parts)


def r_supervised_verdicts(res: Results) -> str:
    claims = res.claims("supervised")
    return f"**{count_text(claims)}**. {_verdict_lists(claims)}"


def r_supervised_counts(res: Results) -> str:
    claims = res.claims("supervised")
    n = counts(claims)
    return f"decides {n['reproduced'] + n['contradicted']} of {len(claims)} claims: {n['reproduced']} reproduced, " \
           f"{n['contradicted']} contradicted, {n['inconclusive']} inconclusive"






def r_contrastive_verdicts(res: Results) -> str:
    claims = res.claims("contrastive")
    return f"**{count_text(claims)}**. {_verdict_lists(claims)}"


def _seed_stability(res: Results) -> tuple[list[dict[str, str]], str]:
    text = res.text("examples/results/seed_stability.md")
    rows = table_with(text, "claim", "changed")
    return rows, text


def _verdict(cell: str) -> str:
    """The verdict at the end of a comparison cell (``estimate [low, high] verdict``)."""
    return cell.rsplit(" ", 1)[-1]


def _verdict_changes(rows: list[dict[str, str]], a: str, b: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The rows of a comparison table (nmtune_study.report.compare) whose verdict differs between
    columns ``a`` and ``b``, and those of them that flip between reproduced and contradicted."""
    changed = [r for r in rows if _verdict(r[a]) != _verdict(r[b])]
    return changed, [r for r in changed if {_verdict(r[a]), _verdict(r[b])} == {"reproduced", "contradicted"}]


def r_seed_stability(res: Results) -> str:
    rows, _ = _seed_stability(res)
    committed = {c["claim"][:70]: c for c in res.claims("supervised")}
    first = [k for k in rows[0] if k.startswith("seeds ")]
    base, other = first[0], first[1]
    stale = []
    for row in rows:
        c = next((v for k, v in committed.items() if k.startswith(row["claim"][:60])), None)
        if c is None or not row[base].endswith(c["verdict"]):
            stale.append(row["claim"])
    if stale or len(rows) != len(committed):
        return ("The seed-stability comparison in `examples/results/seed_stability.md` was made "
                "on an earlier run and no longer matches `claims.json`; rerun it with "
                "`--seeds 3,4,5 --pretrain-seeds 3,4,5` before quoting it")
    changed, flips = _verdict_changes(rows, base, other)
    kinds = sorted({" and ".join(sorted({_verdict(r[base]), _verdict(r[other])})) for r in changed})
    seeds = other.split(":")[0].replace("seeds ", "")
    if " / " in seeds:  # "pre-training / tuning" (tools/seed_stability.py)
        pre, tune = seeds.split(" / ")
        flags = f"`--pretrain-seeds {pre} --seeds {tune}`"
    else:
        flags = f"`--seeds {seeds} --pretrain-seeds {seeds}`"
    text = f"With other seeds ({flags}) {len(changed)} of {len(rows)} supervised verdicts change"
    if changed:
        text += f" (between {'; '.join(kinds)})"
    text += "; none flips between reproduced and contradicted" if not flips else \
        f"; {len(flips)} flip between reproduced and contradicted"
    return text


def _contrastive_accuracy(res: Results) -> dict[tuple[str, str], dict[str, float]]:
    rows = table_with(res.contrastive_md(), "swapped", "method", "ID acc", "OOD acc")
    out: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        out[(row["swapped"], row["method"].lower())] = {
            k: float(row[k].split("±")[0]) for k in ("ID acc", "ID F1", "OOD acc", "OOD F1") if k in row}
    return out


def r_contrastive_result(res: Results) -> str:
    acc = _contrastive_accuracy(res)
    gammas = list(dict.fromkeys(g for g, _ in acc))
    clean, worst = gammas[0], gammas[-1]
    pre = table_with(res.contrastive_md(), "swapped", "zero-shot val acc (clean)")
    zs = {r["swapped"]: float(r["zero-shot val acc (clean)"]) for r in pre}

    def path(method: str, key: str) -> str:
        values = [acc[(g, method)][key] for g in gammas]
        falls = all(b < a for a, b in zip(values, values[1:]))
        return f"{num(values[0])} → {num(values[-1])}{'' if falls else ' (not at every step)'}"

    methods = [m for m in ("lp", "mlp", "nmtune") if (clean, m) in acc]
    names = {"lp": "LP", "mlp": "MLP", "nmtune": "NMTune"}
    each = "; ".join(f"{names[m]} ID {path(m, 'ID acc')}, OOD {path(m, 'OOD acc')}" for m in methods)
    gap_mlp = sum(acc[(g, "nmtune")]["ID acc"] - acc[(g, "mlp")]["ID acc"] for g in gammas) / len(gammas)
    gap_lp = sum(acc[(g, "nmtune")]["ID acc"] - acc[(g, "lp")]["ID acc"] for g in gammas) / len(gammas)
    fz = table_with(res.contrastive_md(), "swapped", "ID SVE")
    sve = {r["swapped"]: float(r["ID SVE"].split("±")[0]) for r in fz}
    tail = [sve[g] for g in gammas[-2:]]
    return (f"with {clean} → {worst} of the pairs swapped, the pre-training zero-shot accuracy went from "
            f"{zs[clean]:.1f} % to {zs[worst]:.1f} %, and the downstream accuracy (percent, {clean} → {worst}) was "
            f"{each}; NMTune's ID accuracy, averaged over γ, was {num(gap_mlp, sign=True)} points from MLP "
            f"tuning's and {num(gap_lp, sign=True)} from LP's; the SVE of the frozen ID features was "
            f"{sve[clean]:.2f} clean and {min(tail):.2f}–{max(tail):.2f} at {gammas[-2]}–{worst}")


def _contrastive_costs(res: Results) -> dict[str, float]:
    rec = res.contrastive_records()
    pre = rec.get("pretrain", {})
    timing = rec.get("timing", {})
    cpu = [p["cpu_seconds"] for p in pre.values() if "cpu_seconds" in p]
    return {
        "models": len(pre),
        "pairs": next((p["num_pairs"] for p in pre.values() if "num_pairs" in p), 0),
        "pretrain_cpu": timing.get("pretrain_cpu_seconds_recorded", sum(cpu)),
        "evaluate_cpu": timing.get("evaluate_cpu_seconds_recorded", 0.0),
        "per_model_cpu": sum(cpu) / max(len(cpu), 1),
        "stage_wall": res.timing().get("wall", {}).get("contrastive", 0.0),
        "stage_cpu": res.timing().get("cpu", {}).get("contrastive", 0.0),
    }


def r_contrastive_size(res: Results) -> str:
    c = _contrastive_costs(res)
    return f"{c['models']} small CLIPs (open_clip's model factory, `ClipLoss` and tokenizer) on {c['pairs']:,} glyph " \
           f"image–caption pairs"


def r_contrastive_runtime(res: Results) -> str:
    c = _contrastive_costs(res)
    total = c["pretrain_cpu"] + c["evaluate_cpu"]
    return (f"{total:.0f} s of CPU time in all, as recorded in `records.json`: pre-training {c['pretrain_cpu']:.0f} s "
            f"({c['models']} models, {c['per_model_cpu']:.0f} s each on average) and evaluation "
            f"{c['evaluate_cpu']:.0f} s, about {total / 60:.0f} minutes on one core; the contrastive stage of the "
            f"committed run took {c['stage_wall']:.0f} s wall and {c['stage_cpu']:.0f} s of CPU with `--jobs 2` "
            f"(`timing.json`, summed over its calls)")


_OTHER_REGIMES = ("contrastive", "language")  # stages of timing.json that are not the supervised study


def _supervised_stages(res: Results) -> tuple[list[tuple[str, float, float]], float, float]:
    timing = res.timing()
    wall, cpu = timing.get("wall", {}), timing.get("cpu", {})
    stages = [(k, wall[k], cpu.get(k, 0.0)) for k in wall if k not in _OTHER_REGIMES]
    return stages, sum(s[1] for s in stages), sum(s[2] for s in stages)




def r_study_stages(res: Results) -> str:
    stages, wall, cpu = _supervised_stages(res)
    each = "; ".join(f"{name} {w:.0f} s wall / {c:.0f} s CPU" for name, w, c in stages)
    return f"{each}; {wall:.0f} s wall and {cpu:.0f} s CPU in all"


def r_language_result(res: Results) -> str:
    comps = res.language().get("comparisons", [])
    n = counts(comps)
    names = {"id_acc": "ID", "ood_acc": "OOD"}
    each = "; ".join(
        f"{c['task']} {names.get(c['key'], c['key'])} vs {c['vs'].upper()} {num(c['estimate'], sign=True)} points, "
        f"95 % CI [{num(c['ci_low'], sign=True)}, {num(c['ci_high'], sign=True)}], {c['verdict']}" for c in comps)
    return (f"of the {len(comps)} paired NMTune comparisons, {n['reproduced']} reproduced, {n['contradicted']} "
            f"contradicted and {n['inconclusive']} inconclusive ({each}; tuning seeds and test-set sampling combined)")


def r_language_runtime(res: Results) -> str:
    meta = res.language().get("meta", {})
    return (f"{meta['wall_seconds']:.0f} s of wall time ({minutes(meta['wall_seconds'])}) on "
            f"`{meta.get('machine', '?')}`: loading the encoder {meta.get('encoder_load_seconds', 0):.0f} s, encoding "
            f"the {meta.get('texts_encoded', 0):,} texts {meta.get('encode_seconds', 0):.0f} s "
            f"({meta.get('encode_throughput', 0):.0f} texts/s), tuning the heads {meta.get('tune_seconds', 0):.0f} s")


def _kernels_table(res: Results) -> dict[tuple[int, int], dict[str, str]]:
    rows = table_with(section(res.bench(), "bench_kernels: all shapes"), "dtype", "fast/naive", "default/naive")
    return {(int(r["M"]), int(r["D"])): r for r in rows if r["dtype"] == "float32"}


def _overhead_table(res: Results) -> dict[tuple[str, int, int], dict[str, str]]:
    rows = table_with(section(res.bench(), "bench_overhead"), "head", "nmtune/mlp", "bound/mlp")
    return {(r["head"], int(r["M"]), int(r["D"])): r for r in rows}


PERF_SHAPES = ((256, 768), (1024, 768), (256, 2048), (512, 4096), (256, 8192))


def r_perf_table(res: Results) -> str:
    kern, over = _kernels_table(res), _overhead_table(res)
    lines = ["| (M, D) | regularizer fwd+bwd vs naive, default float64 spectrum | vs naive, `precision=\"float32\"` | "
             "NMTune head step vs MLP head step (paper head) | lower bound for any exact method |",
             "|---|---|---|---|---|"]
    for m, d in PERF_SHAPES:
        k = kern[(m, d)]
        o = over.get(("paper", m, d))
        step = (ratio(o["nmtune/mlp"]), ratio(o["bound/mlp"])) if o else ("", "")
        lines.append(f"| ({m}, {d}) | {ratio(k['default/naive'])} | {ratio(k['fast/naive'])} | "
                     f"{step[0]} | {step[1]} |")
    return "\n" + "\n".join(lines) + "\n"


def r_official_head(res: Results) -> str:
    over = _overhead_table(res)
    shapes = [(m, d) for m, d in PERF_SHAPES if ("official", m, d) in over]
    return ", ".join(f"{ratio(over[('official', m, d)]['nmtune/mlp'])} at ({m}, {d})" for m, d in shapes)


def r_centred_kernel_cost(res: Results) -> str:
    rows = table_with(section(res.bench(), "2026-11-23"), "default path, old", "default path, new")
    default, fast = [], []
    for r in rows:
        old, new = (float(r[k].split()[0]) for k in ("default path, old", "default path, new"))
        default.append((new / old - 1) * 100)
        f_old, f_new = (float(v.split()[0]) for v in r["fast path, old → new"].split("→"))
        fast.append(((f_new / f_old - 1) * 100, r["float32 (M, D)"]))
    worst = max(fast)
    return (f"{min(default):.0f}–{max(default):.0f} % more time for the default path's forward and backward and "
            f"{min(f for f, _ in fast):.0f}–{worst[0]:.0f} % more for the float32 path ({num(worst[0], 0, sign=True)} % "
            f"at {worst[1]})")


def r_kernel_errors(res: Results) -> str:
    rows = table_with(section(res.bench(), "bench_kernels: all shapes"), "features", "path", "grad_rel_err")
    geo = {r["path"]: r for r in rows if r["features"].startswith("geometric")}
    decay = next(r["features"] for r in rows if r["features"].startswith("geometric")).split()[-1]
    fast = float(geo["fast"]["grad_rel_err"])
    return (f"The default path matches a float64 SVD to a loss error of {sci(float(geo['default']['loss_rel_err']))} "
            f"and a gradient error of {sci(float(geo['default']['grad_rel_err']))} on a spectrum decaying to {decay} "
            f"(the float32 path: {fast * 100:.0f} % gradient error there)")


def _lora_cache(res: Results) -> dict[str, dict[str, str]]:
    rows = table_with(section(res.bench(), "2026-11-23"), "model", "cached/LoRA", "NMTune/LoRA")
    return {r["model"].split()[0]: r for r in rows}


def r_lora_cache(res: Results) -> str:
    rows = list(_lora_cache(res).values())
    cached = " / ".join(f"{float(r['cached/LoRA']):.2f}×" for r in rows)
    plain = " / ".join(f"{float(r['NMTune/LoRA']):.2f}×" for r in rows)
    return f"{cached} a LoRA step with a warm cache vs {plain} without"


def r_lora_cache_cpu(res: Results) -> str:
    rows = list(_lora_cache(res).values())
    plain = " and ".join(f"{float(r['NMTune/LoRA']):.2f}×" for r in rows)
    cached = " and ".join(f"{float(r['cached/LoRA']):.2f}×" for r in rows)
    cpu = " and ".join(f"{float(r['CPU-time cached/LoRA']):.2f}" for r in rows)
    return f"{plain} a LoRA step, nearly all of it the extra adapter-disabled forward for `F`; with a warm " \
           f"reference cache {cached} (CPU-time ratios {cpu})"


def r_lora_cache_table(res: Results) -> str:
    names = {"all-MiniLM-L6-v2": "all-MiniLM-L6-v2", "timm": "ViT-S/16 @ 112 px"}
    lines = ["| model | LoRA | LoRA + NMTune | cached | cached / LoRA (wall, CPU) | uncached / LoRA (wall, CPU) |",
             "|---|---|---|---|---|---|"]
    for key, r in _lora_cache(res).items():
        lines.append(f"| {names.get(key, r['model'])} | {r['LoRA ms']} ms | {r['LoRA+NMTune ms']} ms | "
                     f"{r['cached ms']} ms | {r['cached/LoRA']}, {r['CPU-time cached/LoRA']} | {r['NMTune/LoRA']}, "
                     f"{r['CPU-time NMTune/LoRA']} |")
    return "\n" + "\n".join(lines) + "\n"


def _lora_memory(res: Results) -> dict[str, dict[str, str]]:
    rows = table_with(section(res.bench(), "2026-12-04: peak memory"), "mode", "peak_MiB")
    return {r["mode"]: r for r in rows}


def r_lora_memory(res: Results) -> str:
    m = _lora_memory(res)
    return (f"peak RSS {m['nmtune']['peak_MiB']} MiB with `F` from the same weights vs "
            f"{m['nmtune_copy']['peak_MiB']} MiB with a second copy, {m['nmtune_ckpt']['peak_MiB']} MiB with gradient "
            f"checkpointing and {m['ce']['peak_MiB']} MiB for LoRA with cross-entropy only; "
            f"{m['nmtune']['params_M']} M parameters held against {m['nmtune_copy']['params_M']} M")


def r_lora_memory_table(res: Results) -> str:
    m = _lora_memory(res)
    labels = (("ce", "LoRA, cross-entropy only"), ("nmtune", "LoRA + NMTune, F via `disable_adapter()`"),
              ("nmtune_ckpt", "same, activation checkpointing"),
              ("nmtune_copy", "LoRA + NMTune, F from a second frozen copy (anti-pattern)"))
    lines = ["| mode | parameters held | RSS after setup | added by one step | peak |", "|---|---|---|---|---|"]
    for key, label in labels:
        r = m[key]
        lines.append(f"| {label} | {r['params_M']} M | {r['setup_MiB']} MiB | {r['step_adds_MiB']} MiB | "
                     f"{r['peak_MiB']} MiB |")
    copy_cost = float(m["nmtune_copy"]["setup_MiB"]) - float(m["nmtune"]["setup_MiB"])
    note = f"A second copy of the backbone costs its whole parameter memory (+{copy_cost:.0f} MiB after setup here)."
    return "\n" + "\n".join(lines) + f"\n\n{note}\n"


def _total(timing: dict[str, dict[str, float]]) -> tuple[float, float]:
    return sum(timing.get("wall", {}).values()), sum(timing.get("cpu", {}).values())


def r_default_runtime(res: Results) -> str:
    wall, cpu = _total(res.json("examples/results/default/timing.json"))
    return (f"{minutes(wall)} of wall time and {minutes(cpu)} of CPU time (`examples/results/default/timing.json`, "
            "summed over the calls that wrote it: the run and re-renders of its report from cached stages)")


def r_faithful_runtime(res: Results) -> str:
    wall, cpu = _total(res.timing())
    return (f"{minutes(wall)} of wall time and {minutes(cpu)} of CPU time (`examples/results/timing.json`, all "
            "stages, summed over the calls that wrote it: the run, its resumptions and re-renders of its report)")


def _memorised(res: Results, regime: str) -> dict[float, list[float]]:
    by = res.json("examples/results/results.json").get("pretrain_memorised", {}).get(regime, {})
    return {float(g): [float(v) for v in seeds.values() if v is not None] for g, seeds in by.items()}


def r_memorisation(res: Results) -> str:
    parts = []
    for regime, what in (("supervised", "flipped labels predicted as their noisy label"),
                         ("contrastive", "swapped pairs whose top-ranked training caption is the swapped-in one")):
        mem = _memorised(res, regime)
        if not mem:
            continue
        each = ", ".join(f"{pct(g)} {sum(v) / len(v):.3f}" for g, v in sorted(mem.items()) if v)
        parts.append(f"{regime}: {what}, by noise ratio {each} (mean over pre-training seeds)")
    return "; ".join(parts) if parts else "no memorisation recorded"


def r_protocol_verdicts(res: Results) -> str:
    parts = []
    for regime in ("supervised", "contrastive"):
        claims = res.claims(regime)
        if not claims:
            continue
        line = f"{regime}: {count_text(claims)} with selected learning rates"
        if any("paper_verdict" in c for c in claims):
            paper = [{"verdict": c["paper_verdict"]} for c in claims if "paper_verdict" in c]
            line += f", {count_text(paper)} with the paper's"
        parts.append(line)
    return "; ".join(parts)


def r_nmtune_margins(res: Results) -> str:
    parts = []
    for regime in ("supervised", "contrastive"):
        for kind in ("ID", "OOD"):
            c = res.claim(regime, f"NMTune beats LP and MLP tuning on {kind} accuracy")
            if c is None:
                continue
            text = f"{regime} {kind} {claim_figure(c)} ({c['verdict']})"
            if "paper_estimate" in c:
                paper = {"estimate": c["paper_estimate"], "ci_low": c["paper_ci_low"], "ci_high": c["paper_ci_high"],
                         "unit": c.get("unit", "points")}
                text += f", paper recipe {claim_figure(paper)} ({c['paper_verdict']})"
            parts.append(text)
    return "; ".join(parts)


MEMORISE_RULE = 0.9  # the supervised regime's length rule (nmtune_study.reproduce.PRETRAIN_RULE): >= 90 % memorised


def _clip_calibration(res: Results) -> list[dict[str, Any]]:
    """The committed CLIP calibration runs (``examples/results/calibration/clip_*``) of the faithful
    pairs, by swap ratio and length."""
    runs = []
    for path in sorted((res.root / "examples" / "results" / "calibration").glob("clip_*/metrics.json")):
        m = res.json(str(path.relative_to(res.root)))
        if "num_pairs" not in m or not m.get("finished"):
            continue
        runs.append({"gamma": float(m["gamma"]), "seed": m["seed"], "epochs": m["config"]["epochs"],
                     "pairs": m["num_pairs"], "memorised": m.get("memorised"), "cpu": m["cpu_seconds"],
                     "zeroshot": m["history"][-1]["zeroshot_val"]})
    return sorted(runs, key=lambda r: (r["gamma"], r["epochs"]))


def r_clip_memorisation_by_length(res: Results) -> str:
    noisy = [r for r in _clip_calibration(res) if r["gamma"] > 0 and r["memorised"] is not None]
    if not noisy:
        return "no CLIP calibration run with swapped pairs is committed"
    g, seed = noisy[-1]["gamma"], noisy[-1]["seed"]
    each = ", ".join(f"{r['epochs']} epochs {r['memorised']:.3f}" for r in noisy if r["gamma"] == g and r["seed"] == seed)
    return f"by pre-training length ({pct(g)} of the pairs swapped, seed {seed}): {each}"


def r_clip_memorisation_cost(res: Results) -> str:
    runs = _clip_calibration(res)
    noisy = [r for r in runs if r["gamma"] > 0 and r["memorised"] is not None]
    if not noisy:
        return "no CLIP calibration run with swapped pairs is committed"
    g, seed = noisy[-1]["gamma"], noisy[-1]["seed"]
    noisy = [r for r in noisy if r["gamma"] == g and r["seed"] == seed]
    each = ", ".join(f"{r['memorised']:.3f} after {r['epochs']} epochs ({r['cpu']:.0f} s of CPU)" for r in noisy)
    text = (f"a calibration CLIP ({pct(g)} of its {noisy[0]['pairs']:,} pairs swapped, pre-training seed {seed}, "
            f"not a study seed; batch 64) retrieves the swapped-in caption first for {each}")
    enough = [r for r in noisy if r["memorised"] >= MEMORISE_RULE]
    c = _contrastive_costs(res)
    if enough:
        r = enough[0]
        text += (f"; by the supervised regime's rule (the shortest schedule that memorises at least "
                 f"{pct(MEMORISE_RULE)}) the contrastive regime would pre-train {r['epochs']} epochs, about "
                 f"{c['models']} × {r['cpu']:.0f} s = {c['models'] * r['cpu'] / 3600:.1f} h of CPU, against "
                 f"{c['models']} × {c['per_model_cpu']:.0f} s for the committed run")
    clean = [r for r in runs if r["gamma"] == 0 and r["seed"] == seed]
    if clean:
        text += "; a clean one's zero-shot accuracy: " + ", ".join(
            f"{100 * r['zeroshot']:.1f} % after {r['epochs']} epochs" for r in clean)
    return text


CLIP_LONG = "examples/results/clip_e60"  # the contrastive regime with longer-trained CLIPs (--clip-epochs)


def r_clip_long_result(res: Results) -> str:
    run = res.json(f"{CLIP_LONG}/results.json")
    claims = [c for c in res.json(f"{CLIP_LONG}/claims.json") if c.get("regime") == "contrastive"]
    short = [c for c in res.json(f"{CLIP_LONG}/short/claims.json") if c.get("regime") == "contrastive"]
    epochs = run["settings"]["clip"]["epochs"]
    base = res.json(f"{CLIP_LONG}/short/results.json")["settings"]["clip"]["epochs"]
    seeds = run["settings"]["pretrain_seeds"]
    mem = run["pretrain_memorised"]["contrastive"]
    each = ", ".join(f"{pct(float(g))} {sum(v.values()) / len(v):.3f}"
                     for g, v in sorted(mem.items(), key=lambda x: float(x[0])))
    clean = run["pretrain_accuracy"]["contrastive"]["0.0"]
    text = (f"with {epochs}-epoch CLIPs (`--clip-epochs {epochs}`, pre-training seeds "
            f"{', '.join(map(str, seeds))}; otherwise the faithful profile) the swapped captions memorised at the end "
            f"of pre-training are, by noise ratio, {each} (mean over the seeds), and the clean CLIPs' zero-shot "
            f"accuracy is {100 * sum(clean.values()) / len(clean):.1f} %. That run decides {count_text(claims)} "
            f"(the {base}-epoch CLIPs of the same seeds: {count_text(short)})")
    margins = []
    for kind in ("ID", "OOD"):
        c = next((c for c in claims if c["claim"].startswith(f"NMTune beats LP and MLP tuning on {kind} accuracy")), None)
        if c is not None:
            margins.append(f"{kind} {claim_figure(c)} ({c['verdict']})")
    if margins:
        text += "; NMTune's margin over the better of LP and MLP tuning: " + ", ".join(margins)
    rows = table_with(res.text(f"{CLIP_LONG}/comparison.md"), "claim", "changed")
    changed, flips = _verdict_changes(rows, *(k for k in rows[0] if k not in ("claim", "changed")))
    return (text + f"; {len(changed)} of {len(rows)} verdicts differ between the two lengths, {len(flips)} of them "
            f"between reproduced and contradicted")


def r_sentence_reference_table(res: Results) -> str:
    body = section(res.bench(), "2026-12-05: the reference of NMTuneSentenceLoss")
    ms = {r["mode"]: r for r in table_with(body, "mode", "cpu_ms", "/base", "/lora")}
    copy = re.search(r"Frozen copy .*?: ([0-9.]+) MiB of parameters and buffers \(([0-9.]+) M parameters\)", body)
    if copy is None:
        raise KeyError("the bench_sentence_reference section does not state the frozen copy's size")
    row = lambda mode, against: f"{ms[mode]['cpu_ms']} ms = {ratio(ms[mode][against])}"  # noqa: E731
    lines = ["| reference | extra memory | CPU per step | against |", "|---|---|---|---|",
             f"| `\"copy\"` | {copy.group(1)} MiB: the {copy.group(2)} M parameters again (float32) | "
             f"**{row('nmtune_copy', '/base')}** | base loss alone, {ms['base']['cpu_ms']} ms |",
             f"| cache hit (key column) | the copy, plus `rows × 384 × 4` bytes of cache (in memory or "
             f"memory-mapped) | {row('nmtune_cached', '/base')} | base loss alone |",
             f"| `\"adapter\"` (LoRA r=8 on query/value) | none | **{row('nmtune_lora', '/lora')}** | LoRA with the "
             f"base loss alone, {ms['lora']['cpu_ms']} ms |"]
    return "\n" + "\n".join(lines) + "\n"


def _byte_model(res: Results, d: int) -> list[dict[str, str]]:
    """The rows of bench_distributed's 32k-batch byte model (RESULTS.md) for float32 features of width ``d``."""
    body = section(res.bench(), "2026-12-04: distributed statistics")
    rows = table_with(body, "ranks", "gather MB", "reduce MB", "gather peak MB", "reduce peak MB")
    return [r for r in rows if r["features"] == "float32" and int(r["D"]) == d]


def _span(values: list[str]) -> str:
    lo, hi = min(values, key=float), max(values, key=float)
    return lo if lo == hi else f"{lo}–{hi}"


def r_distributed_headline(res: Results) -> str:
    rows = _byte_model(res, 768)
    return (f"{_span([r['reduce MB'] for r in rows])} MB per step per rank instead of "
            f"{_span([r['gather MB'] for r in rows])} MB")


def r_distributed_clip_scale(res: Results) -> str:
    parts = []
    for d in (768, 1024):
        rows = _byte_model(res, d)
        g, r = (_span([x[f"{k} MB"] for x in rows]) for k in ("gather", "reduce"))
        gp, rp = (_span([x[f"{k} peak MB"] for x in rows]) for k in ("gather", "reduce"))
        parts.append(f"D = {d}: gather {g} MB per step per rank and {gp} MB of statistics memory, reduce {r} MB "
                     f"and {rp} MB")
    return "; ".join(parts)


RENDERERS: dict[str, Callable[[Results], str]] = {
    "default-runtime": r_default_runtime,
    "faithful-runtime": r_faithful_runtime,
    "memorisation": r_memorisation,
    "clip-memorisation-cost": r_clip_memorisation_cost,
    "clip-memorisation-by-length": r_clip_memorisation_by_length,
    "clip-long-result": r_clip_long_result,
    "protocol-verdicts": r_protocol_verdicts,
    "nmtune-margins": r_nmtune_margins,
    "supervised-verdicts": r_supervised_verdicts,
    "supervised-counts": r_supervised_counts,
    "seed-stability": r_seed_stability,
    "study-stages": r_study_stages,
    "contrastive-verdicts": r_contrastive_verdicts,
    "contrastive-result": r_contrastive_result,
    "contrastive-size": r_contrastive_size,
    "contrastive-runtime": r_contrastive_runtime,
    "language-result": r_language_result,
    "language-runtime": r_language_runtime,
    "perf-table": r_perf_table,
    "official-head": r_official_head,
    "centred-kernel-cost": r_centred_kernel_cost,
    "kernel-errors": r_kernel_errors,
    "lora-cache": r_lora_cache,
    "lora-cache-cpu": r_lora_cache_cpu,
    "lora-cache-table": r_lora_cache_table,
    "lora-memory": r_lora_memory,
    "lora-memory-table": r_lora_memory_table,
    "sentence-reference-table": r_sentence_reference_table,
    "distributed-headline": r_distributed_headline,
    "distributed-clip-scale": r_distributed_clip_scale,
}


# ----------------------------------------------------------------------------------------------
# the blocks


def blocks(text: str) -> list[tuple[str, str]]:
    """``(name, body)`` of every block in ``text``; unpaired or misspelt markers raise."""
    found = [(m.group("name"), m.group("body")) for m in BLOCK.finditer(text)]
    markers = OPEN.findall(text)
    if len(markers) != 2 * len(found):
        raise ValueError(f"unpaired generated-block markers: {markers}")
    for m in BLOCK.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if not m.group("body").startswith("\n") and not text[line_start : m.start()].strip():
            # A line that starts with "<!--" opens a raw HTML block in CommonMark: the inline text
            # after it would be shown without its markdown (code spans, emphasis).
            raise ValueError(f"inline block {m.group('name')!r} starts a line; put a word before it")
    return found


def render_all(root: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """The text of each renderer in ``names`` (default: every one) for the result files under ``root``."""
    res = Results(root)
    return {name: RENDERERS[name](res) for name in (RENDERERS if names is None else names)}


def sync(root: Path, *, check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) every block; returns ``FILE: NAME`` for each stale block."""
    used: dict[str, None] = {}
    for path in doc_files(root):
        if path.exists():
            for name, _ in blocks(path.read_text()):
                if name not in RENDERERS:
                    raise ValueError(
                        f"{path.relative_to(root)}: no renderer for block {name!r} (known: {sorted(RENDERERS)})"
                    )
                used[name] = None
    rendered = render_all(root, used)
    stale: list[str] = []
    for path in doc_files(root):
        if not path.exists():
            continue
        text = path.read_text()

        def replace(m: re.Match[str]) -> str:
            name, body = m.group("name"), m.group("body")
            if body != rendered[name]:
                stale.append(f"{path.relative_to(root)}: {name}")
            return f"<!-- generated:{name} -->{rendered[name]}<!-- /generated:{name} -->"

        new = BLOCK.sub(replace, text)
        if not check and new != text:
            path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: this one)")
    args = parser.parse_args(argv)
    stale = sync(args.root, check=args.check)
    if args.check and stale:
        print("generated blocks that differ from the result files (run python tools/sync_docs.py):", file=sys.stderr)
        for item in stale:
            print(f"  {item}", file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {len(stale)} block(s)" + (": " + ", ".join(stale) if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
