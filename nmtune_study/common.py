"""What every part of the study shares: atomic writes, machine info, simple statistics, metrics.

One definition each, so the vision study, the language study and the contrastive
regime agree:

* :func:`atomic_save` / :func:`atomic_write_text`: write to a temporary file, then
  ``os.replace`` (a killed run never leaves a half-written checkpoint or result);
* :func:`cached`: a value made once and kept in a ``torch.save`` file (rendered data,
  frozen features);
* :func:`machine_info`: one line about the machine for a report;
* :func:`mean_std`: mean and sample standard deviation;
* :func:`spearman`: ``scipy.stats.spearmanr`` (0 where one side is constant);
* :func:`macro_f1`: ``sklearn.metrics.f1_score(average="macro")``, scikit-learn's
  definition (the mean over the classes present in the labels *or* the predictions);
* :func:`hit_rate`: a fraction of hits, NaN over nothing (the memorisation figures of
  both pre-training regimes);
* :func:`binary_f1`, :func:`matthews`, :func:`pearson`: the GLUE metrics of the language
  study, scikit-learn's ``f1_score`` of one class and ``matthews_corrcoef`` and
  ``scipy.stats.pearsonr`` (0 where a side is constant, as :func:`spearman`);
* :data:`SPECTRUM_NORMALIZE_ROWS`: whether SVE / LSVR / spectra of the studies are
  taken on L2-normalised feature rows (``True``: the authors' analysis convention,
  which makes the metrics independent of the feature scale). Both the vision study
  (``evaluate.py``) and the language study (``language.py``) use it;
* :func:`cpu_seconds`: CPU time of this process and its children (what a run costs on
  a shared machine, where wall time is noisy);
* :func:`committed_results`: ``examples/results/`` of the source checkout, where
  ``--refresh-results`` copies a run (never written by default).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import resource
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

__all__ = [
    "SPECTRUM_NORMALIZE_ROWS",
    "noise_ratio",
    "seed_list",
    "atomic_save",
    "atomic_write_text",
    "binary_f1",
    "cached",
    "committed_results",
    "cpu_seconds",
    "run_cells",
    "hit_rate",
    "machine_info",
    "macro_f1",
    "matthews",
    "mean_std",
    "pearson",
    "spearman",
]

#: Spectral metrics (SVE, LSVR, spectra) of both studies use L2-normalised rows.
SPECTRUM_NORMALIZE_ROWS = True
T = TypeVar("T")


def seed_list(text: str) -> list[int]:
    """The command lines' one way to give seeds: ``"3,4,5"``, or ``3 4 5`` with ``nargs="+"``
    (each item may itself be a comma list; flatten with :func:`flat`).

    Example:
        >>> seed_list("3,4,5"), seed_list("7")
        ([3, 4, 5], [7])
    """
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are integers, alone or comma-separated (3,4,5); got {text!r}") from None


def positive_int(text: str) -> int:
    """The command lines' type for counts (epochs, renderings): a whole number >= 1, so that 0 is
    refused instead of falling back to a default.

    Example:
        >>> positive_int("60")
        60
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number; got {text!r}")
    return value


def flat(groups: Iterable[Iterable[int]] | None) -> list[int] | None:
    """``[[3, 4], [5]]`` -> ``[3, 4, 5]`` (``None`` stays ``None``)."""
    return None if groups is None else [x for g in groups for x in g]


def noise_ratio(text: str) -> float:
    """The command lines' one unit for noise and swap ratios: a fraction in [0, 1] (0.1 = 10 %).

    Example:
        >>> noise_ratio("0.1")
        0.1
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a noise ratio is a fraction in [0, 1] (0.1 = 10 %); got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"a noise ratio is a fraction in [0, 1] (0.1 = 10 %), not a percentage; got {text!r}")
    return value


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace``.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.pt"
        >>> atomic_save({"a": 1}, p); p.exists()
        True
    """
    import torch

    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cached(path: str | os.PathLike | None, make: Callable[[], T]) -> T:
    """``make()``, kept in ``path`` (:func:`atomic_save`) and read from it on later calls
    (``path=None``: made every time). A file written before the study became the
    ``nmtune_study`` package names classes of modules that are gone (``_vision_data``...):
    it is made again, as is every cache here, from fixed seeds.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c" / "x.pt"
        >>> cached(p, lambda: [1, 2]), cached(p, lambda: "not called")
        ([1, 2], [1, 2])
    """
    if path is not None and pathlib.Path(path).exists():
        import torch

        try:
            return torch.load(path, weights_only=False)
        except (ModuleNotFoundError, AttributeError):  # pickled under an old module layout
            pass
    value = make()
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(value, path)
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
        >>> atomic_write_text(p, "{}"); p.read_text()
        '{}'
    """
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cells(fn: Callable[..., T], cells: Sequence[tuple], jobs: int,
              done: Callable[[tuple, T], None] | None = None) -> dict[tuple, T]:
    """``fn(*cell)`` for every cell: in ``jobs`` spawned processes when ``jobs > 1`` and there is
    more than one cell (``fn`` must then pickle: a module-level function or a ``functools.partial``
    of one), otherwise here, in order. ``done(cell, result)`` runs here as each cell finishes.
    Each cell seeds itself, so the results do not depend on ``jobs`` or on the finishing order."""
    results: dict[tuple, T] = {}

    def finish(cell: tuple, result: T) -> None:
        results[cell] = result
        if done is not None:
            done(cell, result)

    if jobs > 1 and len(cells) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(fn, *cell): cell for cell in cells}
            for fut in cf.as_completed(futures):
                finish(futures[fut], fut.result())
    else:
        for cell in cells:
            finish(cell, fn(*cell))
    return results


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children.

    Example:
        >>> cpu_seconds() > 0
        True
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine_info(device: str = "cpu") -> str:
    """One line: OS, CPU count, load, torch version and threads, Python, device.

    Example:
        >>> "torch" in machine_info()
        True
    """
    import torch

    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs visible{load}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
            f"device {device}{gpu}")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value, NaN for none).

    Example:
        >>> mean_std([1.0, 3.0])
        (2.0, 1.4142135623730951)
    """
    v = [float(x) for x in values]
    if not v:
        return float("nan"), float("nan")
    mu = sum(v) / len(v)
    sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mu, sd


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``, average ranks for ties);
    0 where either side is constant (scipy gives NaN there).

    Example:
        >>> spearman([0, 1, 2], [3, 1, 2])
        -0.5
    """
    from scipy.stats import spearmanr

    return _correlation(spearmanr, "spearman", x, y)


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Macro-averaged F1, scikit-learn's definition (``zero_division=0``).

    Example:
        >>> round(macro_f1([0, 0, 1, 1], [0, 1, 1, 1]), 4)
        0.7333
    """
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), average="macro", zero_division=0))


def hit_rate(hits: Any, total: int) -> float:
    """``hits.sum() / total`` (a boolean tensor or array), NaN when ``total`` is 0: the
    memorisation figures of both pre-training regimes.

    Example:
        >>> hit_rate(np.array([True, False, True]), 4), hit_rate(np.array([], dtype=bool), 0)
        (0.5, nan)
    """
    return float(hits.sum()) / total if total else float("nan")


def binary_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive`` (GLUE's MRPC / QQP metric): ``sklearn.metrics.f1_score`` of that
    one class, ``zero_division=0`` (also where ``positive`` never occurs).

    Example:
        >>> binary_f1([1, 1, 0, 0], [1, 0, 1, 0])
        0.5
    """
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y_true), np.asarray(y_pred), labels=[positive], average="macro",
                          zero_division=0))


def matthews(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation coefficient (GLUE's CoLA metric; multiclass as Gorodkin 2004):
    ``sklearn.metrics.matthews_corrcoef``, 0 where it is undefined.

    Example:
        >>> round(matthews([1, 1, 0, 0], [1, 0, 0, 0]), 4)
        0.5774
    """
    import warnings

    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():  # one label in both: sklearn warns, and the coefficient is 0 by definition
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return float(matthews_corrcoef(np.asarray(y_true), np.asarray(y_pred)))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson's correlation (``scipy.stats.pearsonr``); 0 where either side is constant
    (scipy gives NaN there).

    Example:
        >>> round(pearson([0, 1, 2], [0, 2, 4]), 12), pearson([0, 1, 2], [1, 1, 1])
        (1.0, 0.0)
    """
    from scipy.stats import pearsonr

    return _correlation(pearsonr, "pearson", x, y)


def _correlation(scipy_stat: Any, name: str, x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
                 ) -> float:
    """``scipy_stat(x, y).statistic`` in float64, 0 where either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"{name} needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(scipy_stat(x, y).statistic)


def committed_results() -> pathlib.Path:
    """``examples/results/`` of the source checkout this package was imported from (the
    committed study results that ``--refresh-results`` overwrites).

    Raises:
        FileNotFoundError: the package is installed, not imported from a checkout.
    """
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "results"
    if not path.is_dir():
        raise FileNotFoundError(f"--refresh-results writes into a source checkout's examples/results/, but "
                                f"nmtune_study was imported from {pathlib.Path(__file__).parent}, outside one; "
                                "run from a checkout (pip install -e .) or pass --out")
    return path
