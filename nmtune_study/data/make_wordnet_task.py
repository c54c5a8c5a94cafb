"""Rebuild ``wordnet_task.jsonl.gz``, the language study's offline task, from WordNet 3.0.

The study's default task (``nmtune_study.language``, ``nmtune_study.data.text.load_wordnet_task``)
is WordNet 3.0 synset definitions and usage examples labelled with their lexicographer
category. No pip package ships WordNet 3.0's database files, so the task itself ships
in this folder, with WordNet's licence beside it (``LICENSE-WordNet-3.0.txt``; the
licence allows redistribution with its notice). This script makes it from Debian's
``wordnet-base`` package (``apt-get install -y wordnet-base``, files in
``/usr/share/wordnet``) with the loader's default arguments, so the shipped task is
exactly the one the Debian files give: same texts, labels, order and ``dataset_id``.
The output is byte-for-byte reproducible (no time or name in the gzip header)::

    python -m nmtune_study.data.make_wordnet_task            # rewrite the shipped file
    python -m nmtune_study.data.make_wordnet_task --check    # exit 1 if it differs from a rebuild
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import tempfile
from pathlib import Path

from nmtune_study.data import text as D

#: the default arguments of ``load_wordnet_task``: the task the study uses
PARAMS = {"pos": ["noun", "verb"], "n_train": 100, "n_test": 40, "n_ood": 60, "min_words": 3,
          "max_classes": None, "seed": 0}


def _debian_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "wordnet-base"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "version unknown"
    return out or "version unknown"


def build(wordnet_dir: str | Path, out: str | Path) -> D.TextTask:
    """Build the default task from a WordNet 3.0 database folder and write it to ``out``."""
    params = dict(PARAMS)
    task = D.load_wordnet_task(wordnet_dir, pos=tuple(params.pop("pos")), **params)
    source = (f"WordNet 3.0 (Princeton University), data.noun and data.verb of Debian's wordnet-base "
              f"{_debian_version()}; built by python -m nmtune_study.data.make_wordnet_task")
    D.write_wordnet_task(task, out, params=PARAMS, source=source)
    return task



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wordnet-dir", default="/usr/share/wordnet", help="WordNet 3.0 database folder")
    p.add_argument("--out", default=str(D.WORDNET_TASK_FILE), help="output .jsonl.gz")
    p.add_argument("--check", action="store_true", help="compare a rebuild with --out instead of writing it")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "wordnet_task.jsonl.gz"
            task = build(a.wordnet_dir, fresh)
            same = Path(a.out).is_file() and filecmp.cmp(fresh, a.out, shallow=False)
        print(f"{task.dataset_id()}: rebuild from {a.wordnet_dir} {'matches' if same else 'DIFFERS FROM'} {a.out}")
        return 0 if same else 1
    task = build(a.wordnet_dir, a.out)
    sizes = ", ".join(f"{s.name} {len(s)}" for s in (task.train, task.id_test, *task.ood.values()))
    print(f"wrote {a.out}: {task.num_classes} classes, {sizes}, dataset_id {task.dataset_id()}, "
          f"{Path(a.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
