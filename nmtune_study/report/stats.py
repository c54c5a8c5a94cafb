"""The statistics of the studies: intervals, verdicts, rank trends. One tested module.

Every claim of the vision study (both regimes) and every comparison of the language
study is decided here:

* :func:`hierarchical_bootstrap`: a two-level percentile bootstrap. Data are an array
  ``(P, T, ...)`` indexed by pre-training seed ``p`` and tuning seed ``t`` (paired: cell
  ``[p, t]`` of every method comes from the same pre-trained model, tuning seed and data
  split). Each replicate draws ``P`` pre-training seeds with replacement, then, for each
  drawn seed independently, ``T`` tuning seeds with replacement, and evaluates the
  statistic; the interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
  the replicates. Seeded and deterministic (``numpy.random.default_rng(seed)``).
  Resampling the pre-training seeds first carries the larger source of variance (which
  model a noise ratio produced) into the interval; with one tuning seed it is the
  ordinary percentile bootstrap over pre-training seeds, with one pre-training seed the
  ordinary bootstrap over tuning seeds (tested against ``scipy.stats.bootstrap``).
* :func:`t_interval`: Student's t interval of a mean (tested against
  ``scipy.stats.ttest_1samp(...).confidence_interval`` and the textbook sleep data).
  With few pre-training seeds a percentile bootstrap is too narrow (it cannot reach
  beyond the range of the seed means), so the reports also give the t interval over the
  pre-training-seed means as a conservative cross-check.
* :func:`study_interval`: what the studies report and decide with: the hierarchical
  bootstrap interval, widened to the t interval over the per-pre-training-seed
  estimates wherever that is wider. With few pre-training seeds the percentile
  bootstrap undercovers (with 3 seeds it cannot reach beyond the range of the three
  seed estimates: about 75 % coverage for a nominal 95 %); the t interval over
  pre-training seeds is valid for the two-level design (each seed's estimate already
  averages its tuning seeds) and dominates there; with many pre-training seeds the two
  agree and the bootstrap also carries the tuning-seed variance.
* :func:`rank_trend`: the mean over pre-training seeds of Spearman's rank correlation
  between the noise ratio and the metric (tuning seeds averaged first) - the statistic
  of the "monotone in gamma" claims, batched for the bootstrap.
* :func:`verdict`: "reproduced" (the interval excludes 0 in the paper's direction),
  "contradicted" (it excludes 0 the other way) or "inconclusive".
* :func:`paired_test_se`, :func:`binomial_se`: test-set sampling error of one accuracy
  and of a paired difference of two accuracies on the same test items.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "VERDICTS",
    "Interval",
    "batched_mean",
    "binomial_se",
    "hierarchical_bootstrap",
    "paired_test_se",
    "study_interval",
    "rank_corr",
    "rank_trend",
    "t_interval",
    "verdict",
]

VERDICTS = ("reproduced", "contradicted", "inconclusive")
N_BOOT = 4000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval.

    Attributes:
        estimate: The statistic on the observed data.
        low: Lower end of the interval.
        high: Upper end of the interval.
        n_pretrain: Pre-training seeds (first resampling level).
        n_tune: Tuning seeds (second level).
        method: How the interval was made (stated in reports).
    """

    estimate: float
    low: float
    high: float
    n_pretrain: int = 1
    n_tune: int = 1
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        """``{"estimate", "ci_low", "ci_high", "n_pretrain", "n_tune", "ci_method"}``."""
        return {"estimate": self.estimate, "ci_low": self.low, "ci_high": self.high,
                "n_pretrain": self.n_pretrain, "n_tune": self.n_tune, "ci_method": self.method}


def batched_mean(samples: np.ndarray) -> np.ndarray:
    """The default statistic: the mean over every axis but the first (the replicates).

    Example:
        >>> batched_mean(np.ones((2, 3, 4))).tolist()
        [1.0, 1.0]
    """
    return samples.reshape(len(samples), -1).mean(axis=1)


def _check_data(data: Any) -> np.ndarray:
    a = np.asarray(data, dtype=np.float64)
    if a.ndim < 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"data must be an array (pretrain seeds, tuning seeds, ...), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("data holds NaN or infinite values")
    return a


def hierarchical_bootstrap(
    data: Any,
    statistic: Callable[[np.ndarray], np.ndarray] = batched_mean,
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Two-level percentile bootstrap: pre-training seeds first, then tuning seeds.

    Args:
        data: ``(P, T, ...)``: pre-training seeds x tuning seeds x anything the
            statistic needs (e.g. noise ratios).
        statistic: Batched: maps ``(B, P, T, ...)`` replicates to ``(B,)`` values.
        n_boot: Replicates.
        level: Confidence level.
        seed: Seed of the resampling (deterministic).

    Returns:
        An :class:`Interval` (``estimate`` is the statistic on ``data`` itself);
        unbounded when ``P == T == 1`` (one observation has no interval).

    Example:
        >>> ci = hierarchical_bootstrap([[1.0, 1.2], [0.8, 1.0], [1.1, 1.3]])
        >>> round(ci.estimate, 3), ci.low < ci.estimate < ci.high, ci.n_pretrain, ci.n_tune
        (1.067, True, 3, 2)
    """
    a = _check_data(data)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    p, t = a.shape[:2]
    rng = np.random.default_rng(seed)
    est = float(statistic(a[None])[0])
    if p == 1 and t == 1:  # one observation: nothing to resample, no interval
        return Interval(est, -math.inf, math.inf, 1, 1, "one observation: no interval")
    idx_p = rng.integers(0, p, size=(n_boot, p))
    idx_t = rng.integers(0, t, size=(n_boot, p, t))
    rep = np.asarray(statistic(a[idx_p[:, :, None], idx_t]), dtype=np.float64)
    lo, hi = np.quantile(rep, [(1 - level) / 2, (1 + level) / 2])
    return Interval(est, float(lo), float(hi), p, t,
                    f"hierarchical percentile bootstrap ({n_boot} replicates, seed {seed}): pre-training seeds "
                    "resampled first, then tuning seeds within each")


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student's t interval of the mean of ``values`` (``n - 1`` degrees of freedom).

    Example (Student's sleep data, paired differences of the two drugs; the textbook
    interval is 0.700 to 2.460):
        >>> d = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]
        >>> ci = t_interval(d)
        >>> round(ci.estimate, 2), round(ci.low, 3), round(ci.high, 3)
        (1.58, 0.7, 2.46)
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64).ravel()
    n = len(v)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(v.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, n, 1, "t interval (one value: unbounded)")
    half = float(student_t.ppf((1 + level) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, 1, f"Student t interval, {n - 1} degrees of freedom")


def study_interval(
    data: Any,
    statistic: Callable[[np.ndarray], np.ndarray] = batched_mean,
    *,
    seed: int = 0,
    level: float = LEVEL,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[Interval, Interval, Interval]:
    """``(combined, bootstrap, t)``: the combined interval spans both the hierarchical
    bootstrap interval and the t interval over the per-pre-training-seed values of the
    statistic (clipped to ``bounds``, e.g. ``(-1, 1)`` for a correlation).

    Example:
        >>> both, boot, t = study_interval([[1.0, 1.1], [1.4, 1.5], [0.9, 1.0]])
        >>> both.low == min(boot.low, t.low) and both.high == max(boot.high, t.high)
        True
    """
    a = _check_data(data)
    boot = hierarchical_bootstrap(a, statistic, seed=seed, level=level)
    per = [float(statistic(a[i:i + 1][None])[0]) for i in range(a.shape[0])]
    t = t_interval(per, level)
    t = dataclasses.replace(t, low=max(t.low, bounds[0]), high=min(t.high, bounds[1]), estimate=boot.estimate,
                            n_tune=a.shape[1])
    both = dataclasses.replace(boot, low=min(boot.low, t.low), high=max(boot.high, t.high),
                               method=boot.method + f"; widened to the {t.method} over the pre-training-seed "
                               "estimates where that is wider")
    return both, boot, t


def rank_corr(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of ``x`` with each row of ``y`` (``(..., G)``), with
    average ranks for ties; 0 where a row is constant.

    Example:
        >>> rank_corr([0, 1, 2, 3], np.array([[1.0, 2, 3, 4], [4, 3, 3, 1]])).round(4).tolist()
        [1.0, -0.9487]
    """
    from scipy.stats import rankdata

    rx = rankdata(np.asarray(x, dtype=np.float64))
    ry = rankdata(np.asarray(y, dtype=np.float64), axis=-1)
    rx = rx - rx.mean()
    ry = ry - ry.mean(axis=-1, keepdims=True)
    den = np.sqrt((rx @ rx) * (ry * ry).sum(axis=-1))
    num = (ry * rx).sum(axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def rank_trend(levels: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic for a trend claim on data ``(P, T, G)`` (``G`` = ``len(levels)``): the mean
    over pre-training seeds of ``rank_corr(levels, mean over tuning seeds)``.

    Example:
        >>> stat = rank_trend([0.0, 0.1, 0.2])
        >>> float(stat(np.array([[[[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]]]]))[0])
        0.0
    """
    lv = list(levels)

    def stat(samples: np.ndarray) -> np.ndarray:
        return rank_corr(lv, samples.mean(axis=2)).mean(axis=1)

    return stat


def verdict(low: float, high: float, direction: int) -> str:
    """"reproduced" / "contradicted" / "inconclusive" from an interval and the sign the
    paper claims (``+1``: the quantity is positive, ``-1``: negative).

    Example:
        >>> verdict(0.1, 0.5, +1), verdict(0.1, 0.5, -1), verdict(-0.1, 0.5, +1)
        ('reproduced', 'contradicted', 'inconclusive')
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if low > 0:
        return "reproduced" if direction > 0 else "contradicted"
    if high < 0:
        return "reproduced" if direction < 0 else "contradicted"
    return "inconclusive"


def binomial_se(p: float, n: int) -> float:
    """Standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` on ``n`` test items.

    Example:
        >>> round(binomial_se(0.5, 100), 3)
        0.05
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired_test_se(correct_a: Sequence[float], correct_b: Sequence[float]) -> float:
    """Standard error of ``acc(a) - acc(b)`` from per-item correctness (0/1) of two
    classifiers on the *same* test items: ``std(a - b, ddof=1) / sqrt(n)`` (only the
    discordant items count, as in McNemar's test).

    Example:
        >>> round(paired_test_se([1, 1, 0, 1], [1, 0, 0, 1]), 3)
        0.25
    """
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"correct_a and correct_b must be 1-d of one length >= 2, got {a.shape} and {b.shape}")
    return float(np.std(a - b, ddof=1) / math.sqrt(len(a)))
