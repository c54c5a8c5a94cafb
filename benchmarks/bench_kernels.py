"""Cost of the NMTune regularizer against the naive formulation, measured in one run.

For each feature shape ``(M, D)`` and dtype this times the forward and
backward of all three terms plus the SVE/LSVR metrics (what one training step
asks for) on four paths, repeats interleaved, medians reported:

* ``naive``: explicit ``D x D`` covariance with an off-diagonal mask,
  ``torch.linalg.svd`` for ``L_SVD``, a separate ``svdvals`` for SVE/LSVR, in
  the input dtype (``benchmarks/_common.py: naive_regularizer``);
* ``fast``: ``NMTuneRegularizer(precision="float32")`` (one float32 Gram
  product on the smaller side, float32 ``eigvalsh``);
* ``default``: ``NMTuneRegularizer()`` (the same in float64);
* ``floor``: one Gram product ``z z^T`` (or ``z^T z``) forward and backward in
  the input dtype -- the least work any exact method must do.

It also reports peak extra memory per call and the loss/gradient error of each
path against the float64 ``torch.linalg.svd`` reference of ``tests/reference.py``,
on random features and on features whose spectrum decays geometrically to 1e-6.

Usage::

    python benchmarks/bench_kernels.py                 # CPU, default shapes (a few minutes)
    python benchmarks/bench_kernels.py --quick         # seconds
    python benchmarks/bench_kernels.py --compile --shapes 256x2048   # adds torch.compile rows
    python benchmarks/bench_kernels.py --device cuda   # on a GPU

Writes ``bench_kernels.csv`` and ``bench_kernels.md`` to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

import _common as C  # noqa: N812  (benchmarks/ is on sys.path when run as a script)
from nmtune import NMTuneRegularizer

DEFAULT_SHAPES = "64x512,256x768,256x2048,1024x768,512x4096,256x8192"
QUICK_SHAPES = "64x512,256x768"
ERROR_SHAPE = (256, 2048)
QUICK_ERROR_SHAPE = (64, 512)

# Targets of issue 6 (CPU, float32 features).
TARGETS = {
    ("fast", (256, 2048)): 0.15,
    ("fast", (512, 4096)): 0.12,
    ("default", (256, 2048)): 0.30,
}


def _regularizer(precision: str) -> NMTuneRegularizer:
    return NMTuneRegularizer("paper", precision=precision, check_finite=False)


def _step(fn: Callable[[torch.Tensor, torch.Tensor], Any], z: torch.Tensor, f: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn`` on a fresh leaf copy of ``z``."""

    def run() -> None:
        leaf = z.detach().requires_grad_()
        out = fn(leaf, f)
        loss = out.loss if hasattr(out, "loss") else out[0] if isinstance(out, tuple) else out
        loss.backward()

    return run


def _ours(reg: NMTuneRegularizer) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    return lambda z, f: reg(z, f, return_components=True)  # the metrics come from the same spectrum


def _floor(rows: bool, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    return lambda z, f: C.gram(z.to(dtype), rows).sum()


def time_shape(
    m: int, d: int, dtype: torch.dtype, device: torch.device, *, repeats: int, compile_: bool
) -> dict[str, Any]:
    z = torch.randn(m, d, dtype=dtype, device=device)
    f = z + 0.5 * torch.randn(m, d, dtype=dtype, device=device)
    rows = m < d
    fns = {
        "naive": _step(lambda a, b: C.naive_regularizer(a, b), z, f),
        "fast": _step(_ours(_regularizer("float32")), z, f),
        "default": _step(_ours(_regularizer("float64")), z, f),
        "floor": _step(_floor(rows, dtype), z, f),
        "floor64": _step(_floor(rows, torch.float64), z, f),
    }
    row: dict[str, Any] = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "M": m, "D": d}
    if compile_:
        for name, precision in (("fast_compiled", "float32"), ("default_compiled", "float64")):
            compiled = torch.compile(_regularizer(precision), fullgraph=True, dynamic=False)
            fns[name] = _step(lambda a, b, c=compiled: c(a, b, return_components=True), z, f)
            start = time.perf_counter()
            fns[name]()  # compile outside the timed region
            row[f"{name}_compile_s"] = time.perf_counter() - start
    ms = C.interleaved_medians(fns, device, repeats=repeats, warmup=1)
    for name, value in ms.items():
        row[f"{name}_ms"] = value
    for name in ("fast", "default", "fast_compiled", "default_compiled"):
        if name in ms:
            row[f"{name}/naive"] = ms[name] / ms["naive"]
            row[f"{name}/floor"] = ms[name] / ms["floor"]
    row["default/floor64"] = ms["default"] / ms["floor64"]
    for name in ("naive", "fast", "default", "floor"):
        row[f"{name}_peak_MiB"] = C.peak_memory_mb(fns[name], device)
    return row


def error_rows(shape: tuple[int, int], device: torch.device) -> list[dict[str, Any]]:
    """Loss and gradient relative errors against the float64 SVD reference."""
    ref = C.load_reference()
    m, d = shape
    g = torch.Generator().manual_seed(1)
    inputs = {
        "random": torch.randn(m, d, generator=g),
        "geometric to 1e-6": C.geometric_features(m, d, smallest=1e-6) * math.sqrt(m),
    }
    rows = []
    for kind, z in inputs.items():
        z = z.to(device)
        f = z + 0.5 * torch.randn(m, d, generator=g).to(device)
        leaf = z.detach().double().requires_grad_()
        ref_loss = ref.regularizer(leaf, f.double())
        (ref_grad,) = torch.autograd.grad(ref_loss, leaf)
        candidates: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "fast": _regularizer("float32"),
            "default": _regularizer("float64"),
            "naive (float32)": lambda a, b: C.naive_regularizer(a, b)[0],
        }
        for name, fn in candidates.items():
            leaf = z.detach().float().requires_grad_()
            loss = fn(leaf, f.float())
            (grad,) = torch.autograd.grad(loss, leaf)
            rows.append({
                "features": kind, "M": m, "D": d, "path": name,
                "loss_rel_err": C.relative_error(loss, ref_loss),
                "grad_rel_err": C.relative_error(grad, ref_grad),
            })
    return rows


def check_targets(rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> list[str]:
    """One line per target of issue 6: the figure and MET / MISSED."""
    lines = []
    f32 = [r for r in rows if r["dtype"] == "float32" and r["device"] == "cpu"]
    by_shape = {(r["M"], r["D"]): r for r in f32}
    for (path, shape), bound in TARGETS.items():
        if shape in by_shape:
            value = by_shape[shape][f"{path}/naive"]
            lines.append(f"{path} path at {shape}: {value:.3f}x naive (target <= {bound}x): "
                         f"{'MET' if value <= bound else 'MISSED'}")
    slower = [(r["dtype"], r["M"], r["D"], p) for r in rows for p in ("fast", "default") if r[f"{p}/naive"] > 1]
    lines.append("neither path slower than naive at any measured shape: "
                 + ("MET" if not slower else f"MISSED at {slower}"))
    for e in errors:
        if e["path"] == "default":
            ok = e["loss_rel_err"] <= 1e-6 and e["grad_rel_err"] <= 1e-3
            lines.append(f"default path errors ({e['features']}, {e['M']}x{e['D']}): loss {e['loss_rel_err']:.2e} "
                         f"(<= 1e-6), grad {e['grad_rel_err']:.2e} (<= 1e-3): {'MET' if ok else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shapes", default=None, help=f"MxD list (default {DEFAULT_SHAPES})")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per path (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine OpenMP contention dominates; 0 = torch default)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True) (inductor)")
    parser.add_argument("--no-errors", action="store_true", help="skip the accuracy table")
    parser.add_argument("--quick", action="store_true", help="two small shapes, float32, 2 repeats")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    args = parser.parse_args(argv)

    device = C.setup(args.threads, args.device)
    shapes = C.parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    dtypes = ["float32"] if args.quick and args.dtypes == "float32,float64" else args.dtypes.split(",")
    repeats = args.repeats or (2 if args.quick else 3)
    info = C.machine_info(device)
    print("machine:", info, flush=True)

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for m, d in shapes:
            row = time_shape(m, d, dtype, device, repeats=repeats, compile_=args.compile)
            rows.append(row)
            print(f"{dtype_name} {m}x{d}: naive {row['naive_ms']:.1f} ms, fast {row['fast_ms']:.1f} ms "
                  f"({row['fast/naive']:.3f}x), default {row['default_ms']:.1f} ms ({row['default/naive']:.3f}x), "
                  f"floor {row['floor_ms']:.1f} ms", flush=True)
    errors = [] if args.no_errors else error_rows(QUICK_ERROR_SHAPE if args.quick else ERROR_SHAPE, device)
    targets = check_targets(rows, errors)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.write_csv(rows, args.out_dir / "bench_kernels.csv")
    if errors:
        C.write_csv(errors, args.out_dir / "bench_kernels_errors.csv")
    columns = ["dtype", "M", "D", "naive_ms", "fast_ms", "default_ms", "floor_ms",
               "fast/naive", "default/naive", "fast/floor", "default/floor", "default/floor64"]
    if args.compile:
        columns += ["fast_compiled_ms", "default_compiled_ms", "fast_compiled/naive", "default_compiled/naive"]
    memory = ["dtype", "M", "D", "naive_peak_MiB", "fast_peak_MiB", "default_peak_MiB", "floor_peak_MiB"]
    text = [
        "# bench_kernels", "", C.machine_markdown(info), "",
        f"Regularizer forward+backward (all three terms + SVE/LSVR), median of {repeats} interleaved repeats, ms.",
        "", C.markdown_table(rows, columns), "", "Peak extra memory per call (MiB).", "",
        C.markdown_table(rows, memory), "",
    ]
    if errors:
        text += ["Relative error against the float64 `torch.linalg.svd` reference (float32 features).", "",
                 C.markdown_table(errors, ["features", "M", "D", "path", "loss_rel_err", "grad_rel_err"]), ""]
    text += ["Targets:", ""] + [f"- {line}" for line in targets] + [""]
    C.write_report(args.out_dir, "bench_kernels", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
