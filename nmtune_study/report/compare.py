"""Compare the verdicts of two runs of the study, claim by claim.

Two runs that differ in one thing (the seed sets, the CLIP's pre-training length...) are
compared from their ``claims.json``: one table per regime with each claim's estimate,
95 % interval and verdict in both runs, whether the verdict changed, and how many verdicts
flip between reproduced and contradicted. ``tools/seed_stability.py`` is the two-seed-set
comparison; other comparisons run this module::

    python -m nmtune_study.report.compare runs/reproduce-faithful runs/reproduce-clip-e60 \\
        --labels "CLIP 20 epochs" "CLIP 60 epochs" --regimes contrastive \\
        --title "Contrastive verdicts with a CLIP that memorises" --out examples/results/clip_e60/comparison.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["claim_figure", "compare_claims", "load_claims", "main", "parser"]


def load_claims(run: str | Path) -> list[dict[str, Any]]:
    """The claims of a run folder (its ``claims.json``)."""
    path = Path(run) / "claims.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the folder of a finished run of reproduce_paper.py")
    return json.loads(path.read_text())


def claim_figure(c: dict[str, Any]) -> str:
    """``estimate [low, high] verdict`` with the claim's precision (3 decimals for nats and rho)."""
    d = 3 if c.get("unit") in ("nats", "rho") else 2
    return f"{c['estimate']:+.{d}f} [{c['ci_low']:+.{d}f}, {c['ci_high']:+.{d}f}] {c['verdict']}"


def compare_claims(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], labels: Sequence[str], *,
                   header: Sequence[str], regimes: Sequence[str] | None = None) -> str:
    """The markdown comparison of claims ``a`` (the reference run) and ``b``.

    Args:
        a, b: the two runs' claims (``claims.json``); a claim of ``a`` missing from ``b`` is left out.
        labels: the column label of each run.
        header: the lines above the tables (title, what differs, the commands).
        regimes: the regimes to compare (default: every regime of ``a``, in its order).

    Example:
        >>> c = {"claim": "x", "regime": "supervised", "verdict": "reproduced", "estimate": 1.0,
        ...      "ci_low": 0.5, "ci_high": 1.5, "unit": "points"}
        >>> text = compare_claims([c], [dict(c, verdict="contradicted")], ["A", "B"], header=["# t", ""])
        >>> text.splitlines()[-1]
        'Verdicts flipping between reproduced and contradicted: 1.'
    """
    if len(labels) != 2:
        raise ValueError(f"labels must name the two runs; got {list(labels)}")
    lines = list(header)
    flips = 0
    for regime in regimes or dict.fromkeys(c.get("regime", "supervised") for c in a):
        other = {c["claim"]: c for c in b if c.get("regime", "supervised") == regime}
        lines += [f"## {regime}", "", f"| claim | {labels[0]}: estimate [CI] verdict | {labels[1]}: estimate [CI] "
                  "verdict | changed |", "|---|---|---|---|"]
        for c in (c for c in a if c.get("regime", "supervised") == regime):
            o = other.get(c["claim"])
            if o is None:
                continue
            flips += {c["verdict"], o["verdict"]} == {"reproduced", "contradicted"}
            lines.append(f"| {c['claim'][:70]} | {claim_figure(c)} | {claim_figure(o)} | "
                         f"{'yes' if c['verdict'] != o['verdict'] else ''} |")
        lines.append("")
    lines.append(f"Verdicts flipping between reproduced and contradicted: {flips}.")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference", type=Path, help="the reference run's folder (its claims.json)")
    p.add_argument("other", type=Path, help="the other run's folder")
    p.add_argument("--labels", nargs=2, required=True, help="the column label of each run")
    p.add_argument("--title", required=True)
    p.add_argument("--intro", default="", help="a paragraph under the title (what differs, the commands)")
    p.add_argument("--regimes", nargs="+", default=None, help="default: every regime of the reference run")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the comparison and print its last line; exit status 0."""
    a = parser().parse_args(argv)
    header = [f"# {a.title}", ""] + ([a.intro, ""] if a.intro else [])
    text = compare_claims(load_claims(a.reference), load_claims(a.other), a.labels, header=header, regimes=a.regimes)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(text.splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
