"""Global-batch statistics under DDP: rows gathered vs D x D moments all-reduced (issue 21).

For ``W`` gloo ranks on this machine (CPU processes) and a grid of local batch
``M_local`` and width ``D``, one step of ``NMTuneRegularizer(gather_distributed=True,
equal_local_batches=True, check_finite=False)`` -- forward and backward, float32
features, the default float64 precision -- with ``distributed_statistics`` =

* ``gather``: all-gather the rows (``M_global x D``), reduce-scatter their gradient;
* ``reduce``: all-reduce the rows' sum and the centred ``D x D`` scatter, and the
  ``(D + 1) x D`` gradient of the statistics;
* ``auto``: ``reduce`` when ``M_global > D``, else ``gather``.

Per step and rank it reports the bytes the collectives handled (counted at the
collectives by :class:`nmtune.testing.CollectiveBytes`, checked against the byte
model below) and the step time (median of interleaved repeats, the slowest rank's),
as ratios against ``gather`` measured in the same run. The ranks share this
machine's cores, so the times are those of an oversubscribed CPU, not of a network:
the bytes are the portable result.

Then the byte model, evaluated where it matters (64 and 256 ranks, a 32k global
batch, D = 768 and 1024), with the per-rank peak memory of the statistics:

* gather: ``2 M_global D s_in`` bytes per step (forward all-gather, backward
  reduce-scatter; ``s_in`` the features' element size); memory
  ``M_global D (s_in + 2 s_c) + 3 D^2 s_c`` (the gathered rows, their compute-dtype
  copy and its centred copy, the Gram and its eigenvectors; ``s_c`` = 8 in float64);
* reduce: ``2 (D^2 + D) s_c`` bytes; memory ``2 M_local D s_c + 4 D^2 s_c`` (the local
  rows upcast and centred, scatter, Gram, eigenvectors, the gradient block).

A ring all-gather or reduce-scatter sends ``(W - 1)/W`` of those bytes per rank, a
ring all-reduce ``2 (W - 1)/W``: the table gives both.

Usage::

    nice python benchmarks/bench_distributed.py            # 2 and 4 ranks, 6 shapes (a few minutes)
    python benchmarks/bench_distributed.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from nmtune import NMTuneRegularizer  # noqa: E402
from nmtune.distributed import statistics_path  # noqa: E402
from nmtune.testing import CollectiveBytes  # noqa: E402

PATHS = ("gather", "reduce", "auto")
SIZES = {"bfloat16": 2, "float32": 4, "float64": 8}


# ----------------------------------------------------------------------------- byte model


def model_bytes(path: str, world: int, m_local: int, d: int, s_in: int, s_c: int = 8) -> int:
    """Bytes per step per rank at the collectives (equal local batches, no shape exchange)."""
    path = statistics_path(path, world * m_local, d)
    if path == "gather":
        return 2 * world * m_local * d * s_in
    return 2 * (d * d + d) * s_c


def ring_bytes(path: str, world: int, m_local: int, d: int, s_in: int, s_c: int = 8) -> float:
    """What a ring algorithm sends per rank for :func:`model_bytes`."""
    factor = 1.0 if statistics_path(path, world * m_local, d) == "gather" else 2.0
    return factor * (world - 1) / world * model_bytes(path, world, m_local, d, s_in, s_c)


def model_memory(path: str, world: int, m_local: int, d: int, s_in: int, s_c: int = 8) -> int:
    """Peak bytes of the statistics on one rank (the row-sized tensors plus the D x D work)."""
    if statistics_path(path, world * m_local, d) == "gather":
        return world * m_local * d * (s_in + 2 * s_c) + 3 * d * d * s_c
    return 2 * m_local * d * s_c + 4 * d * d * s_c


# ----------------------------------------------------------------------------- measured


def _worker(rank: int, world: int, init: str, out: str, grid: list[tuple[int, int]], repeats: int,
            threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    rows = []
    try:
        for m, d in grid:
            g = torch.Generator().manual_seed(rank)
            f = torch.randn(m, d, generator=g) + 3.0
            z0 = f + 0.1 * torch.randn(m, d, generator=g)
            regs = {p: NMTuneRegularizer(gather_distributed=True, equal_local_batches=True, check_finite=False,
                                         distributed_statistics=p) for p in PATHS}

            def step(path: str) -> None:
                z = z0.clone().requires_grad_()
                regs[path](z, f).backward()

            moved = {}
            for path in PATHS:  # one counted step each (also the warm-up)
                with CollectiveBytes() as counter:
                    step(path)
                moved[path] = counter.total
            times: dict[str, list[float]] = {p: [] for p in PATHS}
            for r in range(repeats):
                for path in PATHS[r % 3:] + PATHS[: r % 3]:
                    dist.barrier()
                    start = time.perf_counter()
                    step(path)
                    times[path].append((time.perf_counter() - start) * 1e3)
            med = torch.tensor([statistics.median(times[p]) for p in PATHS], dtype=torch.float64)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
            row: dict[str, Any] = {"ranks": world, "M_local": m, "D": d, "M_global": world * m,
                                   "auto_path": statistics_path("auto", world * m, d)}
            for i, path in enumerate(PATHS):
                row[f"{path}_bytes"] = moved[path]
                row[f"{path}_model_bytes"] = model_bytes(path, world, m, d, s_in=4)
                row[f"{path}_ms"] = float(med[i])
            for path in ("reduce", "auto"):
                row[f"{path}/gather bytes"] = moved[path] / moved["gather"]
                row[f"{path}/gather time"] = row[f"{path}_ms"] / row["gather_ms"]
            rows.append(row)
            if rank == 0:
                print(f"W={world} M_local={m} D={d}: bytes gather {moved['gather']}, reduce {moved['reduce']}, "
                      f"auto {moved['auto']} ({row['auto_path']}); ms gather {row['gather_ms']:.1f}, "
                      f"reduce {row['reduce_ms']:.1f}, auto {row['auto_ms']:.1f}", flush=True)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, out)


def measure(world: int, grid: list[tuple[int, int]], repeats: int, threads: int) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, grid, repeats, threads), nprocs=world)
        return torch.load(out, weights_only=False)


def model_rows(worlds: list[int], global_batch: int, dims: list[int]) -> list[dict[str, Any]]:
    rows = []
    for world in worlds:
        m = global_batch // world
        for d in dims:
            for dtype in ("bfloat16", "float32"):
                s_in = SIZES[dtype]
                g, r = (model_bytes(p, world, m, d, s_in) for p in ("gather", "reduce"))
                rows.append({
                    "ranks": world, "M_global": world * m, "M_local": m, "D": d, "features": dtype,
                    "auto_path": statistics_path("auto", world * m, d),
                    "gather MB": g / 1e6, "reduce MB": r / 1e6, "reduce/gather bytes": r / g,
                    "gather ring MB": ring_bytes("gather", world, m, d, s_in) / 1e6,
                    "reduce ring MB": ring_bytes("reduce", world, m, d, s_in) / 1e6,
                    "gather peak MB": model_memory("gather", world, m, d, s_in) / 1e6,
                    "reduce peak MB": model_memory("reduce", world, m, d, s_in) / 1e6,
                })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4", help="numbers of gloo ranks (default 2,4)")
    parser.add_argument("--m-local", default="64,256,1024", help="local batch sizes")
    parser.add_argument("--dims", default="128,768", help="feature widths D")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per path (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (default 1)")
    parser.add_argument("--quick", action="store_true", help="2 ranks, M_local 16 and 64, D 32")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    args = parser.parse_args(argv)

    worlds = [2] if args.quick and args.worlds == "2,4" else [int(w) for w in args.worlds.split(",")]
    ms = [16, 64] if args.quick and args.m_local == "64,256,1024" else [int(m) for m in args.m_local.split(",")]
    dims = [32] if args.quick and args.dims == "128,768" else [int(d) for d in args.dims.split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    grid = [(m, d) for d in dims for m in ms]
    info = C.machine_info(torch.device("cpu"))
    info["threads"] = f"{args.threads} per rank"
    print("machine:", info, flush=True)

    rows = []
    for world in worlds:
        rows += measure(world, grid, repeats, args.threads)
    mismatched = [r for r in rows for p in PATHS if r[f"{p}_bytes"] != r[f"{p}_model_bytes"]]
    table = model_rows([64, 256], 32768, [768, 1024])

    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.write_csv(rows, args.out_dir / "bench_distributed.csv")
    C.write_csv(table, args.out_dir / "bench_distributed_model.csv")
    cols = ["ranks", "M_local", "D", "M_global", "auto_path", "gather_bytes", "reduce_bytes", "auto_bytes",
            "reduce/gather bytes", "auto/gather bytes", "gather_ms", "reduce/gather time", "auto/gather time"]
    mcols = ["ranks", "M_local", "D", "features", "auto_path", "gather MB", "reduce MB", "reduce/gather bytes",
             "gather ring MB", "reduce ring MB", "gather peak MB", "reduce peak MB"]
    lines = [
        "# bench_distributed", "", C.machine_markdown(info), "",
        "Bytes per step per rank counted at the collectives (float32 features, float64 statistics) and "
        "step time (forward + backward, median, slowest rank), ratios against `gather` in the same run:", "",
        C.markdown_table(rows, cols), "",
        "Byte model " + ("matches every count above." if not mismatched else
                         f"DIFFERS from {len(mismatched)} count(s): see the CSV."), "",
        "Byte model at 32k global batch (equal local batches; MB = 1e6 bytes, float64 statistics):", "",
        C.markdown_table(table, mcols),
    ]
    C.write_report(args.out_dir, "bench_distributed", lines)
    if mismatched:
        raise SystemExit("the counted bytes differ from the byte model")


if __name__ == "__main__":
    main()
