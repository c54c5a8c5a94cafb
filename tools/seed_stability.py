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

from nmtune_study.report.compare import compare_claims, load_claims


def _seeds(run: Path) -> str:
    s = json.loads((run / "results.json").read_text())["settings"]
    return f"seeds {','.join(map(str, s['pretrain_seeds']))} / {','.join(map(str, s['seeds']))}"


def compare(a: Path, b: Path, commands: list[str]) -> str:
    """The markdown comparison of run ``a`` (the committed one) and run ``b``."""
    pa, pb = (set(json.loads((r / "results.json").read_text())["settings"]["pretrain_seeds"]) for r in (a, b))
    if pa & pb:
        raise ValueError(f"both runs pre-trained with seeds {sorted(pa & pb)}; the comparison needs disjoint "
                         "pre-training seed sets")
    header = ["# Seed stability of the committed study's verdicts", "",
              f"Same code and settings, two disjoint seed sets (pre-training / tuning): the committed run "
              f"(`{commands[0]}`) and `{commands[1]}`. Estimates and combined 95% intervals as in "
              "[report.md](report.md).", ""]
    return compare_claims(load_claims(a), load_claims(b), [_seeds(a), _seeds(b)], header=header)


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
