"""A tiny run of each benchmark script: it runs, writes its CSV/markdown, and the ratios are finite.

Timings are never asserted (see STYLE.md); only that the scripts work.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_bench_pretrain_smoke(tmp_path: Path) -> None:
    code = _run("bench_pretrain.py", "--quick", "--classes", "5", "--out-dir", str(tmp_path))
    assert code == 0
    rows = _rows(tmp_path / "bench_pretrain.csv")
    assert [r["variant"] for r in rows] == ["baseline", "channels_last", "batch256"]
    assert float(rows[0]["rate/baseline"]) == 1.0
    assert all(math.isfinite(float(r["images_per_s"])) and float(r["images_per_s"]) > 0 for r in rows)


@pytest.mark.distributed
def test_bench_distributed_smoke(tmp_path: Path) -> None:
    code = _run("bench_distributed.py", "--quick", "--out-dir", str(tmp_path))
    assert code == 0  # nonzero also when a count differs from the byte model
    rows = _rows(tmp_path / "bench_distributed.csv")
    assert [(r["ranks"], r["M_local"], r["D"], r["auto_path"]) for r in rows] == [
        ("2", "16", "32", "gather"), ("2", "64", "32", "reduce")]
    for row in rows:
        ratios = _ratios(row)
        assert {"reduce/gather bytes", "auto/gather bytes", "reduce/gather time", "auto/gather time"} <= set(ratios)
        assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    assert float(rows[1]["auto/gather bytes"]) < 1 and rows[1]["auto_bytes"] == rows[1]["reduce_bytes"]
    model = _rows(tmp_path / "bench_distributed_model.csv")
    assert {(r["ranks"], r["D"]) for r in model} == {("64", "768"), ("64", "1024"), ("256", "768"), ("256", "1024")}
    assert "matches every count" in (tmp_path / "bench_distributed.md").read_text()


def test_bench_sentence_reference_smoke(tmp_path: Path) -> None:
    code = _run("bench_sentence_reference.py", "--quick", "--out-dir", str(tmp_path))
    assert code == 0
    rows = {r["mode"]: r for r in _rows(tmp_path / "bench_sentence_reference.csv")}
    assert set(rows) == {"base", "nmtune_copy", "nmtune_cached", "lora", "nmtune_lora"}
    assert all(float(r["cpu_ms"]) > 0 and math.isfinite(float(r["/base"])) for r in rows.values())
    assert float(rows["nmtune_lora"]["/lora"]) > 0
    text = (tmp_path / "bench_sentence_reference.md").read_text()
    assert "Frozen copy (reference=\"copy\"): 86.7 MiB" in text


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
