"""Shared helpers of the benchmark scripts: timing, memory, naive baseline, output.

Not part of the package. Timing rules (see benchmarks/README.md): every
candidate is measured against its baseline *in the same run*, repeats are
interleaved (baseline, candidate, baseline, ...) so that a burst of load on a
shared machine hits all of them, and the median is reported.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nmtune.testing import HostSyncCounter  # noqa: F401  (re-exported for the benchmark scripts)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- setup


def setup(threads: int, device: str, seed: int = 0, *, malloc: str = "fixed") -> torch.device:
    """Fix the thread count and seed; validate the device.

    ``malloc="fixed"`` (CPU) pins glibc's thresholds for the timings (see
    :func:`_fix_malloc_thresholds`); ``"default"`` leaves glibc's dynamic ones,
    as a plain training script runs.
    """
    if malloc not in ("fixed", "default"):
        raise SystemExit(f"--malloc must be 'fixed' or 'default'; got {malloc!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cpu" and malloc == "fixed":
        _fix_malloc_thresholds()
    return dev


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_reference() -> Any:
    """``tests/reference.py`` (the float64 SVD reference), imported by path."""
    path = ROOT / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("nmtune_tests_reference", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"the reference implementation is missing: {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], device: torch.device, *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time (ms) of each callable, repeats interleaved across callables.

    The order rotates between rounds so that no candidate always runs right
    after the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- memory

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):  # not glibc
        pass


def _malloc_trim() -> None:
    """Give the heap's free memory back to the OS (so a call's peak shows in RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fix_malloc_thresholds() -> None:
    """Fixed glibc thresholds for the timings: 32 MiB mmap, 64 MiB trim.

    These are the values glibc's dynamic thresholds converge to after a few
    large frees, made fixed so that every timed call (baseline and candidate
    alike) runs under the same allocator state. Linux/glibc only.
    """
    _mallopt(32 * 2**20, 64 * 2**20)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak extra memory (MiB) of one call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the
    call. CPU (Linux): the rise of the process's resident-set high-water mark
    (``VmHWM``, reset through ``/proc/self/clear_refs``) above its resident
    size before the call -- page-granular and including BLAS/LAPACK
    workspaces, so an approximation; ``nan`` where unsupported.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # Blocks above 128 KiB come from mmap and go back to the OS on free while
    # measuring, so freed memory does not hide the call's peak. (Never while
    # timing: a page fault on every large allocation made eager code 2-3x slower.)
    _mallopt(128 * 2**10, 128 * 2**10)
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        _fix_malloc_thresholds()
        return math.nan
    try:
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
    finally:
        _fix_malloc_thresholds()
    if before is None or peak is None:
        return math.nan
    return max(peak - before, 0) / 1024


# ----------------------------------------------------------------------------- the Gram floor


class _SymmetricGram(torch.autograd.Function):
    """``x x^T`` (``rows=True``) or ``x^T x`` with a one-matmul backward."""

    @staticmethod
    def forward(x: Tensor, rows: bool) -> Tensor:  # type: ignore[override]
        return x @ x.mT if rows else x.mT @ x

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        x, rows = inputs
        ctx.save_for_backward(x)
        ctx.rows = rows

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        (x,) = ctx.saved_tensors
        sym = grad + grad.mT
        return (sym @ x if ctx.rows else x @ sym), None


def gram(x: Tensor, rows: bool) -> Tensor:
    """Symmetric Gram product of ``x`` on its rows (``x x^T``) or columns, with a one-matmul backward:
    the least work any exact method of the regularizer does (the benchmarks' floor)."""
    return _SymmetricGram.apply(x, rows)


# ----------------------------------------------------------------------------- naive baseline


def naive_regularizer(z: Tensor, f: Tensor, *, lam: float = 0.01, top_k: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The textbook formulation, in the input's dtype: ``(loss, sve, lsvr)``.

    Explicit ``D x D`` covariance with an off-diagonal mask, ``torch.linalg.svd``
    for ``L_SVD`` and a separate ``torch.linalg.svdvals`` call for the SVE/LSVR
    metrics -- what a straightforward implementation of the paper does.
    ``tests/reference.py`` is the same maths always in float64 (used for the
    error figures); this one keeps the dtype so that the float32 comparison is
    fair to the baseline.
    """
    zn = z / z.norm(dim=-1, keepdim=True)
    fn = f / f.norm(dim=-1, keepdim=True)
    mse = (fn - zn).square().sum(-1).mean()
    m, d = z.shape[-2], z.shape[-1]
    zc = z - z.mean(dim=-2, keepdim=True)
    cov = zc.mT @ zc / (m - 1)
    off = ~torch.eye(d, dtype=torch.bool, device=z.device)
    l_cov = (cov[..., off] ** 2).sum(-1).mean() / d
    s = torch.linalg.svd(z, full_matrices=False).S
    l_svd = (-(s[..., :top_k].sum(-1) / s.sum(-1)) / top_k).mean()
    with torch.no_grad():
        sv = torch.linalg.svdvals(z)
        p = sv / sv.sum(-1, keepdim=True)
        sve = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1).mean()
        lsvr = -torch.log(p[..., 0]).mean()
    return lam * (mse + l_cov + l_svd), sve, lsvr


def geometric_features(m: int, d: int, *, smallest: float = 1e-6, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> Tensor:
    """``U diag(s) V^T`` with singular values decaying geometrically from 1 to ``smallest``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, d)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, math.log10(smallest), k, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- output


def fmt(value: Any) -> str:
    """Three significant digits; scientific below 0.01; integers above 1000."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.2e}"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.3g}"
    return str(value)


def significant(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits: a time or rate never rounds to zero on a fast machine."""
    return float(f"{value:.{digits}g}")


def write_report(out_dir: Path, name: str, lines: Sequence[str]) -> None:
    """Write ``out_dir/<name>.md``, print it, and say where the CSV and markdown went."""
    text = "\n".join(lines)
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {out_dir / (name + '.csv')} and {out_dir / (name + '.md')}")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in info.items())


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256x2048,1024x768"`` -> ``[(256, 2048), (1024, 768)]``."""
    shapes = []
    for part in text.split(","):
        try:
            m, d = part.lower().split("x")
            shapes.append((int(m), int(d)))
        except ValueError:
            raise SystemExit(f"--shapes expects MxD,MxD,...; got {text!r}") from None
    return shapes


# ----------------------------------------------------------------------------- host syncs


