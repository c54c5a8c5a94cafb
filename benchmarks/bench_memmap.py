"""Private memory and throughput of ``fit(method="nmtune")`` on memory-mapped features.

The question behind the streaming path (issue 23): a feature file larger than memory
(``np.load(path, mmap_mode="r")``) must train with a private (anonymous) memory that does
not grow with the number of rows ``N``, and at a throughput close to the in-memory path.

* **memory**: for each ``N`` of ``--rows`` (default 1 M and 4 M rows of ``--dim 256``
  float32: 1 GB and 4 GB files under ``--data-dir``), one epoch of
  ``fit(x_memmap, y_memmap, "nmtune")`` in a fresh process; a thread samples ``RssAnon``
  of ``/proc/self/status`` (private anonymous memory; file-backed pages of the mapping
  are not counted) every 2 ms. Reported: the process's private memory before ``fit``,
  its peak during ``fit``, and the growth, next to the file's size.
* **throughput**: at ``--throughput-rows`` (default 262,144 rows, 256 MiB: fits in
  memory), one epoch of the same ``fit`` from the memory map and from an in-memory
  tensor of the same file, interleaved (``--repeats`` each), median rows per second;
  the in-memory path's private memory growth is reported beside it.

Usage::

    python benchmarks/bench_memmap.py                   # writes runs/benchmarks/bench_memmap.{csv,md}
    python benchmarks/bench_memmap.py --rows 20000,40000 --dim 32 --throughput-rows 8192 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MIB = 1 << 20


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise SystemExit("this benchmark reads RssAnon from /proc/self/status (Linux only)")


class _PeakSampler:
    """The highest ``RssAnon`` seen while the ``with`` block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak_kib = interval, _rss_anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _rss_anon_kib())
            time.sleep(self.interval)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _rss_anon_kib())


def _make_data(data_dir: Path, n: int, d: int, classes: int = 10) -> tuple[Path, Path]:
    """``x_{n}x{d}.npy`` (float32, class means plus noise) and ``y_{n}.npy`` (int64), written in chunks."""
    import numpy as np

    data_dir.mkdir(parents=True, exist_ok=True)
    xp, yp = data_dir / f"x_{n}x{d}.npy", data_dir / f"y_{n}.npy"
    if xp.exists() and yp.exists():
        try:
            if np.load(xp, mmap_mode="r").shape == (n, d) and np.load(yp, mmap_mode="r").shape == (n,):
                return xp, yp
        except ValueError:  # a half-written file from an interrupted run
            pass
    rng = np.random.default_rng(0)
    means = rng.standard_normal((classes, d)).astype(np.float32)
    x = np.lib.format.open_memmap(xp, mode="w+", dtype=np.float32, shape=(n, d))
    y = np.lib.format.open_memmap(yp, mode="w+", dtype=np.int64, shape=(n,))
    step = 1 << 16
    for start in range(0, n, step):
        stop = min(n, start + step)
        labels = np.arange(start, stop) % classes
        y[start:stop] = labels
        x[start:stop] = means[labels] + rng.standard_normal((stop - start, d), dtype=np.float32)
    x.flush()
    y.flush()
    del x, y
    return xp, yp


def _child(args: argparse.Namespace) -> dict[str, float | str]:
    """One measurement in this (fresh) process; see the module docstring."""
    import numpy as np
    import torch

    from nmtune import TuningConfig, fit

    torch.set_num_threads(args.threads)
    cfg = TuningConfig(epochs=1, batch_size=args.batch_size, seed=0)
    x = np.load(args.x, mmap_mode="r")
    y = np.load(args.y, mmap_mode="r")
    if args.child == "memory":
        # warm up torch's lazy one-time allocations on a tiny fit, so the growth is the data's
        fit(torch.randn(64, x.shape[1]), torch.arange(64) % 2, "nmtune", config=TuningConfig(epochs=1, batch_size=32))
        before = _rss_anon_kib()
        start = time.perf_counter()
        with _PeakSampler() as sampler:
            fit(x, y, "nmtune", config=cfg)
        seconds = time.perf_counter() - start
        return dict(rows=x.shape[0], file_MiB=round(os.path.getsize(args.x) / MIB, 1),
                    private_before_MiB=round(before / 1024, 1), private_peak_MiB=round(sampler.peak_kib / 1024, 1),
                    growth_MiB=round((sampler.peak_kib - before) / 1024, 1), epoch_s=float(f"{seconds:.4g}"),
                    rows_per_s=round(x.shape[0] / seconds))
    # throughput: memmap vs an in-memory tensor of the same rows, interleaved
    fit(torch.randn(64, x.shape[1]), torch.arange(64) % 2, "nmtune", config=TuningConfig(epochs=1, batch_size=32))
    before = _rss_anon_kib()
    with _PeakSampler() as sampler:
        xt, yt = torch.from_numpy(np.load(args.x)), torch.from_numpy(np.load(args.y))
        fit(xt, yt, "nmtune", config=cfg)
    in_memory_growth = (sampler.peak_kib - before) / 1024
    times: dict[str, list[float]] = {"memmap": [], "in_memory": []}
    heads = {}
    for _ in range(args.repeats):
        for name, (xs, ys) in (("in_memory", (xt, yt)), ("memmap", (x, y))):
            start = time.perf_counter()
            heads[name] = fit(xs, ys, "nmtune", config=cfg).head
            times[name].append(time.perf_counter() - start)
    same = all(torch.equal(a, b) for a, b in zip(heads["memmap"].state_dict().values(),
                                                  heads["in_memory"].state_dict().values()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(rows=x.shape[0], file_MiB=round(os.path.getsize(args.x) / MIB, 1),
                in_memory_rows_per_s=round(x.shape[0] / med["in_memory"]),
                memmap_rows_per_s=round(x.shape[0] / med["memmap"]),
                **{"memmap/in_memory": round(med["in_memory"] / med["memmap"], 3)},
                in_memory_growth_MiB=round(in_memory_growth, 1), same_head=str(same))


def _spawn(args: argparse.Namespace, kind: str, xp: Path, yp: Path) -> dict[str, float | str]:
    cmd = [sys.executable, __file__, "--child", kind, "--x", str(xp), "--y", str(yp), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,4000000", help="comma list of N for the memory runs")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--throughput-rows", type=int, default=262144)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/nmtune_bench_memmap"),
                        help="where the feature files go (they are kept for a rerun unless --delete-data)")
    parser.add_argument("--delete-data", action="store_true", help="delete the feature files at the end")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/benchmarks"),
                        help="where the tables go (default: runs/benchmarks under the working directory)")
    parser.add_argument("--child", choices=("memory", "throughput"), help=argparse.SUPPRESS)
    parser.add_argument("--x", help=argparse.SUPPRESS)
    parser.add_argument("--y", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    import torch

    import _common as C

    torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.rows.split(",") if v.strip()]
    files = []
    memory = []
    for n in sizes:
        xp, yp = _make_data(args.data_dir, n, args.dim)
        files += [xp, yp]
        memory.append(_spawn(args, "memory", xp, yp))
        print(json.dumps(memory[-1]), flush=True)
    xp, yp = _make_data(args.data_dir, args.throughput_rows, args.dim)
    files += [xp, yp]
    throughput = _spawn(args, "throughput", xp, yp)
    print(json.dumps(throughput), flush=True)
    if args.delete_data:
        for f in files:
            f.unlink(missing_ok=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    if memory:
        C.write_csv(memory, args.out_dir / "bench_memmap.csv")
    C.write_csv([throughput], args.out_dir / "bench_memmap_throughput.csv")
    growth = [float(r["growth_MiB"]) for r in memory]
    ratio = (growth[-1] / growth[0]) if len(growth) > 1 and growth[0] > 0 else float("nan")
    file_ratio = float(memory[-1]["file_MiB"]) / float(memory[0]["file_MiB"]) if len(memory) > 1 else float("nan")
    C.write_report(args.out_dir, "bench_memmap", [
        "# bench_memmap", "", C.machine_markdown(C.machine_info(torch.device("cpu"))), "",
        f"One epoch of `fit(x, y, \"nmtune\")` (paper head, batch {args.batch_size}, {args.threads} thread(s)) on "
        f"memory-mapped float32 features of width {args.dim}, fresh process per run; private memory = `RssAnon` "
        "sampled every 2 ms.", "",
        C.markdown_table(memory, ["rows", "file_MiB", "private_before_MiB", "private_peak_MiB", "growth_MiB",
                                  "epoch_s", "rows_per_s"]) if memory else "(no memory runs: --rows was empty)", "",
        f"Growth from the smallest to the largest N: {ratio:.2f}x for a {file_ratio:.0f}x larger file."
        if len(memory) > 1 else "", "",
        f"Throughput at {args.throughput_rows} rows (fits in memory), median of {args.repeats} interleaved epochs:", "",
        C.markdown_table([throughput], ["rows", "file_MiB", "in_memory_rows_per_s", "memmap_rows_per_s",
                                        "memmap/in_memory", "in_memory_growth_MiB", "same_head"]), "",
    ])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
