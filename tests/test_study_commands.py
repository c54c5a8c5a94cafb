"""Every study command that README.md, docs/*.md and examples/README.md show still runs.

* Each documented command line (``python examples/NAME.py ...``, ``torchrun ...
  examples/NAME.py ...``, ``python -m nmtune_study.MODULE ...``) is parsed by its
  command's own parser: a flag renamed or removed, or a value it no longer takes, fails
  here, naming the file and the command.
* Each entry point starts as its own process, as a user runs it (``--help``): the thin
  ``examples/*.py`` scripts and ``python -m nmtune_study.MODULE`` import the package
  with no ``sys.path`` edit.
* The tiny command lines the docs give run as written (output folder aside); every other
  command runs at tiny size in the test file named in ``TINY_RUNS``.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
#: Where each command runs at tiny size in the suite (in process or as ``python examples/NAME.py``).
TINY_RUNS = {
    "reproduce_paper": "test_examples_vision.py::test_reproduce_paper_tiny and the tiny command below",
    "pretrain": "test_examples_vision.py::test_pretrain_killed_process_resumes_to_identical_weights",
    "evaluate": "test_examples_vision.py::test_pretrain_and_evaluate_on_imagefolder",
    "language": "test_language.py::test_tiny_end_to_end_with_the_real_minilm",
    "contrastive": "the tiny command below (and test_contrastive.py, in process)",
    "pretrain_clip": "test_contrastive.py::test_sigkill_mid_pretraining_then_rerun_gives_identical_weights",
    "noisy_shards": "test_contrastive_shards.py::test_cli_expands_brace_ranges",
}
_COMMAND = re.compile(r"(?:\bpython3?\s+|\btorchrun\b[^\n]*?\s)(examples/\w+\.py|-m\s+nmtune_study[\w.]*)([^\n]*)")


def _env() -> dict[str, str]:
    """This environment, with the checkout importable when nmtune_study is not installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _module_of(script: Path) -> str:
    """The module a thin entry point runs (``from nmtune_study.X import main``)."""
    found = re.search(r"^from (nmtune_study[\w.]*) import main$", script.read_text(), re.M)
    assert found, f"{script.name} is not a thin entry point (from nmtune_study.X import main)"
    return found.group(1)


def _snippets(text: str) -> list[str]:
    """Code lines of a markdown file: fenced blocks, indented or not (continuations joined,
    comments dropped, a shell loop's variable set to its first value), and inline code
    spans (which may wrap across lines)."""
    fence = r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```"
    out = []
    for block in re.findall(fence, text, re.S | re.M):
        loops = dict(re.findall(r"\bfor (\w+) in (\S+)", block))
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#.*$", "", line)
            out.append(re.sub(r"\$(\w+)", lambda v: loops.get(v.group(1), v.group(0)), line))
    prose = re.sub(fence, "", text, flags=re.S | re.M)
    out += [span.replace("\\\n", " ").replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """``(doc, module, argv)`` of every study command line in the docs; placeholders
    (``...``, ``MODULE``, ``NAME``) are passed over, optional parts (``[--buffer N]``) kept."""
    found = []
    for doc in DOCS:
        for snippet in _snippets(doc.read_text(encoding="utf-8")):
            for m in _COMMAND.finditer(snippet):
                target, rest = m.group(1), m.group(2).strip()
                if "..." in rest or re.search(r"\b(MODULE|NAME)\b", target + rest):
                    continue
                if target.startswith("-m"):
                    module = target.split()[-1]
                else:
                    module = _module_of(ROOT / target)
                argv = [t.strip("[]") for t in shlex.split(rest.split("|")[0].split("->")[0].split(";")[0])]
                found.append((str(doc.relative_to(ROOT)), module, argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_every_command() -> None:
    assert len(COMMANDS) >= 25, f"only {len(COMMANDS)} study commands found in the docs: did the pattern rot?"
    shown = {module for _, module, _ in COMMANDS}
    assert {_module_of(s) for s in SCRIPTS} <= shown, f"undocumented: {sorted({_module_of(s) for s in SCRIPTS} - shown)}"
    assert set(TINY_RUNS) == {s.stem for s in SCRIPTS}


@pytest.mark.parametrize("doc, module, argv", COMMANDS, ids=[f"{d}:{m.split('.')[-1]}:{' '.join(a)[:40]}"
                                                             for d, m, a in COMMANDS])
def test_documented_command_parses(doc: str, module: str, argv: list[str]) -> None:
    mod = importlib.import_module(module)
    if argv[:1] == ["write-config"]:  # pretrain_clip.py's subcommand
        parser, argv = mod.write_config_parser(), argv[1:]
    else:
        parser = mod.parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{module} {' '.join(argv)}` no longer parses (exit {exc.code})")


@pytest.mark.parametrize("command", [[str(s)] for s in SCRIPTS]
                         + [["-m", "nmtune_study.reproduce"], ["-m", "nmtune_study.data.make_wordnet_task"]],
                         ids=[s.name for s in SCRIPTS] + ["-m reproduce", "-m make_wordnet_task"])
def test_entry_point_starts_as_its_own_process(command: list[str], tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("usage:"), run.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("script", ["reproduce_paper", "contrastive"])
def test_documented_tiny_command_runs(script: str, tmp_path: Path) -> None:
    """The docs' ``--tiny`` command of each script, as written but for the output folder."""
    (doc, module, argv), *_ = [(d, m, a) for d, m, a in COMMANDS if m == _module_of(ROOT / "examples" / f"{script}.py")
                               and "--tiny" in a]
    out = argv.index("--out") + 1
    argv = [*argv[:out], str(tmp_path / "out"), *argv[out + 1:]]
    run = subprocess.run([sys.executable, str(ROOT / "examples" / f"{script}.py"), *argv], capture_output=True,
                         text=True, timeout=840, env=_env(), cwd=tmp_path)
    assert run.returncode == 0, f"{doc}: {script}.py {' '.join(argv)}\n{run.stderr[-3000:]}"
    report = tmp_path / "out" / ("report.md" if script == "reproduce_paper" else "results.md")
    assert report.is_file() and "NMTune" in report.read_text()
    assert not (tmp_path / "runs").exists()  # --out is honoured: nothing under ./runs
