"""A tiny run of each benchmark script: it runs, writes its CSV/markdown, and the ratios are finite.

Timings are never asserted (see STYLE.md); only that the scripts work.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> int:
    """Run a benchmark script as a user would (its own process: no sys.path or thread-count leaks)."""
    return subprocess.run([sys.executable, str(BENCH / script), *args], timeout=600).returncode


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _ratios(row: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if "/" in k and v != ""}


def test_bench_kernels_smoke(tmp_path: Path) -> None:
    code = _run("bench_kernels.py", "--quick", "--shapes", "16x24,40x8", "--dtypes", "float32", "--repeats", "1",
                "--out-dir", str(tmp_path))
    assert code == 0
    rows = _rows(tmp_path / "bench_kernels.csv")
    assert [(r["M"], r["D"]) for r in rows] == [("16", "24"), ("40", "8")]
    for row in rows:
        ratios = _ratios(row)
        assert {"fast/naive", "default/naive", "fast/floor", "default/floor"} <= set(ratios)
        assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    errors = _rows(tmp_path / "bench_kernels_errors.csv")
    default = [e for e in errors if e["path"] == "default"]
    assert len(default) == 2 and all(float(e["loss_rel_err"]) <= 1e-6 for e in default)
    text = (tmp_path / "bench_kernels.md").read_text()
    assert "| float32 | 16 | 24 |" in text and "Targets:" in text and "torch:" in text


def test_bench_overhead_smoke(tmp_path: Path) -> None:
    code = _run("bench_overhead.py", "--quick", "--shapes", "16x32", "--repeats", "1", "--lora-batch", "4",
                "--lora-seq", "8", "--malloc", "default", "--out-dir", str(tmp_path))
    assert code == 0
    rows = _rows(tmp_path / "bench_overhead.csv")
    assert [r["head"] for r in rows] == ["paper", "official"]
    for row in rows:
        ratios = _ratios(row)
        assert {"lp/mlp", "nmtune/mlp", "nmtune_fast/mlp", "bound/mlp"} <= set(ratios)
        assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
        assert ratios["bound/mlp"] > 1.0  # MLP step plus two positive timings
        assert row["nmtune_host_syncs"] == "0" and int(row["nmtune_checked_host_syncs"]) >= 1
    (lora,) = _rows(tmp_path / "bench_overhead_lora.csv")
    assert math.isfinite(float(lora["lora_nmtune/lora"])) and float(lora["lora_nmtune/lora"]) > 0
    text = (tmp_path / "bench_overhead.md").read_text()
    assert "no host sync from nmtune's code in an NMTune step" in text and "| bound/mlp |" in text
    assert "malloc: glibc defaults" in text


def test_bench_memmap_smoke(tmp_path: Path) -> None:
    # one memory run and the throughput run (each a fresh process: the script's default compares two sizes)
    code = _run("bench_memmap.py", "--rows", "3000", "--dim", "8", "--throughput-rows", "2000", "--repeats", "1",
                "--batch-size", "256", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path))
    assert code == 0
    rows = _rows(tmp_path / "bench_memmap.csv")
    assert [r["rows"] for r in rows] == ["3000"]
    assert all(math.isfinite(float(r["growth_MiB"])) and float(r["epoch_s"]) > 0 for r in rows)
    (throughput,) = _rows(tmp_path / "bench_memmap_throughput.csv")
    assert throughput["same_head"] == "True"  # the streamed head is the in-memory head, bit for bit
    assert math.isfinite(float(throughput["memmap/in_memory"]))
    assert "| 3000 |" in (tmp_path / "bench_memmap.md").read_text()
