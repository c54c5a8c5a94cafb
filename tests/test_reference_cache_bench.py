"""benchmarks/bench_lora.py runs end to end at a tiny size (timings are never asserted)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft", reason='needs the "lora" extra: pip install "nmtune[lora]"')
pytest.importorskip("timm", reason='needs the "vision" extra')

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lora_tiny(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--tiny", "--repeats", "1", "--batches", "2",
         "--full-finetuning", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-3:-1]
    models = [line.split("  ")[0] for line in last]
    assert models == ["tiny BERT (2 layers, width 32)", "timm vit_tiny_patch16_224 @ 32px"]
    assert all("lora+nmtune(cached)/lora: " in line and "lora+nmtune/lora: " in line for line in last)
    with (tmp_path / "bench_lora.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert math.isfinite(float(row["lora+nmtune(cached)/lora"])) and float(row["lora+nmtune/lora"]) > 0
        assert int(row["resident_bytes"]) == int(row["examples"]) * int(row["dim"]) * 4 + int(row["examples"])
        assert int(row["mmap_disk_bytes"]) > 0
        assert int(row["cache_misses"]) == 0 and int(row["cache_hits"]) > 0, "the timed cached steps all hit"
    with (tmp_path / "bench_lora_full_finetuning.csv").open() as fh:
        sources = [r["F from"] for r in csv.DictReader(fh)]
    assert sources == ["none", "frozen copy", "cache", "same weights, no_grad"]
