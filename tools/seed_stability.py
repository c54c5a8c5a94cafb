"""Compare the verdicts of two runs of the study made with disjoint seed sets.

Writes ``examples/results/seed_stability.md`` (one table per regime: each claim's estimate,
interval and verdict in both runs, and whether the verdict changed), from the two runs'
``claims.json``. ``tools/sync_docs.py`` quotes its summary in the README.

Usage::

    python tools/seed_stability.py runs/reproduce-faithful runs/reproduce-faithful-s5 \\
        --commands "python examples/reproduce_paper.py --profile faithful --regime all" \\
                   "... --pretrain-seeds 5,6,7,8,9 --seeds 2,3" \\
        --out examples/results/seed_stability.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _fmt(c: dict[str, Any]) -> str:
    d = 3 if c.get("unit") in ("nats", "rho") else 2
    return f"{c['estimate']:+.{d}f} [{c['ci_low']:+.{d}f}, {c['ci_high']:+.{d}f}] {c['verdict']}"


def _seeds(run: Path) -> str:
    s = json.loads((run / "results.json").read_text())["settings"]
    return f"seeds {','.join(map(str, s['pretrain_seeds']))} / {','.join(map(str, s['seeds']))}"


def compare(a: Path, b: Path, commands: list[str]) -> str:
    """The markdown comparison of run ``a`` (the committed one) and run ``b``."""
    ca, cb = (json.loads((r / "claims.json").read_text()) for r in (a, b))
    sa, sb = _seeds(a), _seeds(b)
    pa, pb = (set(json.loads((r / "results.json").read_text())["settings"]["pretrain_seeds"]) for r in (a, b))
    if pa & pb:
        raise ValueError(f"both runs pre-trained with seeds {sorted(pa & pb)}; the comparison needs disjoint "
                         "pre-training seed sets")
    lines = ["# Seed stability of the committed study's verdicts", "",
             f"Same code and settings, two disjoint seed sets (pre-training / tuning): the committed run "
             f"(`{commands[0]}`) and `{commands[1]}`. Estimates and combined 95% intervals as in "
             "[report.md](report.md).", ""]
    flips = 0
    for regime in dict.fromkeys(c.get("regime", "supervised") for c in ca):
        other = {c["claim"]: c for c in cb if c.get("regime", "supervised") == regime}
        lines += [f"## {regime}", "", f"| claim | {sa}: estimate [CI] verdict | {sb}: estimate [CI] verdict | changed |",
                  "|---|---|---|---|"]
        for c in (c for c in ca if c.get("regime", "supervised") == regime):
            o = other.get(c["claim"])
            if o is None:
                continue
            changed = c["verdict"] != o["verdict"]
            flips += {c["verdict"], o["verdict"]} == {"reproduced", "contradicted"}
            lines.append(f"| {c['claim'][:70]} | {_fmt(c)} | {_fmt(o)} | {'yes' if changed else ''} |")
        lines.append("")
    lines.append(f"Verdicts flipping between reproduced and contradicted: {flips}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("committed", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--commands", nargs=2, required=True, help="the command of each run, as run")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    a.out.write_text(compare(a.committed, a.other, a.commands))
    print(a.out.read_text().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
