"""nmtune_study.report.stats: intervals and verdicts, against a textbook example and scipy."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import stats as sps

from nmtune_study.report import stats as S

SLEEP_DIFF = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]  # Student (1908), drug 2 - drug 1


def test_t_interval_textbook_sleep_data_and_scipy():
    ci = S.t_interval(SLEEP_DIFF)
    # The textbook (R: t.test(extra ~ group, data = sleep, paired = TRUE)): 0.7001142 .. 2.4598858
    assert ci.estimate == pytest.approx(1.58)
    assert ci.low == pytest.approx(0.7001142, abs=1e-6) and ci.high == pytest.approx(2.4598858, abs=1e-6)
    ref = sps.ttest_1samp(SLEEP_DIFF, 0.0).confidence_interval(0.95)
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    one = S.t_interval([2.0])
    assert one.low == -np.inf and one.high == np.inf


def test_one_pretrain_seed_is_the_ordinary_percentile_bootstrap():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, size=30)
    ours = S.hierarchical_bootstrap(x[None, :], n_boot=20000, seed=3)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95,
                        random_state=np.random.default_rng(3)).confidence_interval
    assert ours.estimate == pytest.approx(x.mean())
    width = ref.high - ref.low
    assert abs(ours.low - ref.low) < 0.05 * width and abs(ours.high - ref.high) < 0.05 * width
    assert (ours.n_pretrain, ours.n_tune) == (1, 30)


def test_one_tuning_seed_bootstraps_the_pretrain_seeds():
    x = np.array([0.3, -0.1, 0.8, 0.5, 0.2, 0.9, -0.4, 0.6, 0.1, 0.4])
    ours = S.hierarchical_bootstrap(x[:, None], n_boot=20000, seed=0)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile",
                        random_state=np.random.default_rng(0)).confidence_interval
    width = ref.high - ref.low
    assert abs(ours.low - ref.low) < 0.05 * width and abs(ours.high - ref.high) < 0.05 * width


def test_bootstrap_resamples_pretrain_seeds_first():
    # Two pre-training seeds far apart, identical tuning seeds: the interval must span the
    # seed means (a flat bootstrap over all 2x5 cells would be narrower).
    data = np.array([[0.0] * 5, [1.0] * 5])
    ci = S.hierarchical_bootstrap(data, seed=0)
    assert ci.low == pytest.approx(0.0) and ci.high == pytest.approx(1.0)
    flat = S.hierarchical_bootstrap(data.reshape(1, -1), seed=0)
    assert flat.high - flat.low < ci.high - ci.low
    # Deterministic for a seed, and different for another.
    again = S.hierarchical_bootstrap(np.arange(12.0).reshape(3, 4), seed=5)
    assert again == S.hierarchical_bootstrap(np.arange(12.0).reshape(3, 4), seed=5)


def test_bootstrap_rejects_bad_data():
    with pytest.raises(ValueError, match="shape"):
        S.hierarchical_bootstrap([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        S.hierarchical_bootstrap([[1.0, float("nan")]])
    one = S.hierarchical_bootstrap([[0.4]])
    assert one.estimate == 0.4 and one.low == -np.inf and one.high == np.inf
    assert S.verdict(one.low, one.high, +1) == "inconclusive"
    with pytest.raises(ValueError, match="level"):
        S.hierarchical_bootstrap([[1.0]], level=1.5)


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rank_corr_matches_scipy_spearmanr_with_ties():
    rng = np.random.default_rng(0)
    x = [0.0, 0.05, 0.1, 0.2, 0.3]
    y = rng.integers(0, 3, size=(50, 5)).astype(float)  # many ties
    got = S.rank_corr(x, y)
    for row, g in zip(y, got):
        ref = sps.spearmanr(x, row).statistic
        assert g == pytest.approx(0.0 if np.isnan(ref) else ref, abs=1e-12)


def test_rank_trend_interval_and_verdicts():
    levels = [0.0, 0.1, 0.2, 0.3]
    falling = np.array([[[1.0, 0.9, 0.8, 0.7]] * 3] * 4)  # (P=4, T=3, G=4), strictly falling
    ci = S.hierarchical_bootstrap(falling, S.rank_trend(levels))
    assert ci.estimate == pytest.approx(-1.0) and ci.high == pytest.approx(-1.0)
    assert S.verdict(ci.low, ci.high, -1) == "reproduced"
    assert S.verdict(ci.low, ci.high, +1) == "contradicted"
    mixed = falling.copy()
    mixed[0] = mixed[0][:, ::-1]  # one pre-training seed rises
    ci2 = S.hierarchical_bootstrap(mixed, S.rank_trend(levels))
    assert ci2.estimate == pytest.approx(-0.5) and S.verdict(ci2.low, ci2.high, -1) == "inconclusive"
    with pytest.raises(ValueError, match="direction"):
        S.verdict(0.0, 1.0, 0)


def test_test_set_errors():
    assert S.binomial_se(0.9, 100) == pytest.approx(0.03)
    a = np.array([1, 1, 0, 1, 0, 1, 1, 1])
    b = np.array([1, 0, 0, 1, 1, 1, 0, 1])
    d = a - b
    assert S.paired_test_se(a, b) == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert S.paired_test_se(a, a) == 0.0
    with pytest.raises(ValueError, match="1-d"):
        S.paired_test_se([1, 0], [1])
