"""nmtune.analysis: the spectral summaries users call on their own features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nmtune import analysis as A
from nmtune import functional as NF


def test_spectrum_summary_matches_numpy_reference():
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd((x / x.norm(dim=1, keepdim=True)).numpy(), compute_uv=False)
    p = s / s.sum()
    got = A.spectrum_summary(x, normalize_rows=True)
    assert got["sve"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6)
    assert got["lsvr"] == pytest.approx(float(-np.log(p[0])), rel=1e-6)
    assert got["effective_rank"] == pytest.approx(math.exp(got["sve"]))
    assert got["top1_share"] == pytest.approx(float(p[0]), rel=1e-6)
    raw = A.feature_spectrum(x)  # the default: the rows as they are, as L_SVD sees them
    assert np.allclose(raw.numpy(), np.linalg.svd(x.numpy(), compute_uv=False), rtol=1e-6)


def test_spectrum_summary_is_functionals_formula_including_the_zero_matrix():
    x = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for rows in (True, False):
        m = NF.spectrum_metrics(NF.singular_values(x, normalize_rows=rows))
        got = A.spectrum_summary(x, normalize_rows=rows)
        assert got["sve"] == float(m["sve"]) and got["lsvr"] == float(m["lsvr"])
        assert got["effective_rank"] == float(m["effective_rank"])
    zero = A.spectrum_summary(torch.zeros(4, 3), normalize_rows=False)
    assert zero == {"sve": 0.0, "lsvr": 0.0, "effective_rank": 1.0, "top1_share": 1.0}


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(5), ValueError), (torch.zeros(1, 4), ValueError), (torch.zeros(3, 3, dtype=torch.long), TypeError),
    ([[1.0]], TypeError), (torch.zeros(3, 3, device="meta"), ValueError), (torch.full((3, 2), float("nan")), ValueError),
])
def test_feature_spectrum_rejects_bad_input(bad, error):
    with pytest.raises(error, match="features"):  # named features (a NaN used to be reported as "z")
        A.feature_spectrum(bad)


def test_report_code_left_the_library():
    assert A.__all__ == ["feature_spectrum", "spectrum_summary"]
    assert not hasattr(A, "check_claims") and not hasattr(A, "summarize_records")
