"""Properties of the functional API (permutation and scale invariance, bounds, degenerate inputs).

Values, gradients, errors, devices and dtypes of each operation: tests/test_ops.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmtune.functional as NF

SHAPES = [(8, 32), (40, 6), (16, 16), (2, 5), (7, 1), (3, 10, 20), (2, 2, 12, 5)]


def _rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    (g,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), g


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_zero_and_rank_deficient_inputs_are_finite(shape):
    cases = {
        "zeros": torch.zeros(shape, dtype=torch.float64),
        "rank1": torch.ones(shape, dtype=torch.float64),
        "repeated": torch.eye(*shape, dtype=torch.float64) * 2.0,
        "one-zero-row": torch.cat([torch.zeros(1, shape[1]), _rand((shape[0] - 1, shape[1]))]).double(),
    }
    for name, z in cases.items():
        for fn in (
            NF.covariance_loss,
            NF.singular_value_loss,
            NF.singular_value_entropy,
            NF.largest_singular_value_ratio,
            lambda t: NF.consistency_loss(t, torch.ones_like(t)),
        ):
            v, g = _grad(fn, z)
            assert torch.isfinite(v).all(), name
            assert torch.isfinite(g).all(), name
            assert g.abs().max() < 1e6, f"{name}: exploding gradient {g.abs().max()}"
    zero = torch.zeros(shape, dtype=torch.float64)
    assert float(NF.singular_value_entropy(zero)) == 0.0
    assert float(NF.largest_singular_value_ratio(zero)) == 0.0
    assert float(NF.singular_value_loss(zero)) == -1.0


# ----------------------------------------------------------------------------
# properties


matrices = st.tuples(st.integers(2, 12), st.integers(1, 12), st.integers(0, 2**16), st.floats(0.05, 20.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrices)
def test_properties(params):
    m, d, seed, scale = params
    z = _rand((m, d), seed=seed)
    k = min(m, d)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    cov = NF.covariance_loss(z, precision="float64")
    ratio = NF.singular_value_loss(z)
    sve = NF.singular_value_entropy(z)
    lsvr = NF.largest_singular_value_ratio(z)
    f = _rand((m, d), seed=seed + 1)
    mse = NF.consistency_loss(z, f)
    # permutation of the batch rows changes nothing
    torch.testing.assert_close(NF.covariance_loss(z[perm], precision="float64"), cov)
    torch.testing.assert_close(NF.singular_value_loss(z[perm]), ratio)
    torch.testing.assert_close(NF.singular_value_entropy(z[perm]), sve)
    torch.testing.assert_close(NF.consistency_loss(z[perm], f[perm]), mse)
    # scale invariance of the normalised terms
    torch.testing.assert_close(NF.singular_value_loss(scale * z), ratio)
    torch.testing.assert_close(NF.consistency_loss(scale * z, f), mse)
    torch.testing.assert_close(NF.singular_value_entropy(scale * z), sve)
    # covariance scales with the fourth power... of the second moment: s^4
    torch.testing.assert_close(NF.covariance_loss(scale * z, precision="float64"), cov * scale**4)
    # bounds
    eps = 1e-9
    assert -1.0 - eps <= float(ratio) <= -1.0 / k + eps
    assert -eps <= float(sve) <= math.log(k) + eps
    assert float(lsvr) >= -eps
    assert float(cov) >= -eps
    assert 0.0 <= float(mse) <= 4.0 + eps
    for top_k in range(1, k + 1):
        r = float(NF.singular_value_loss(z, top_k))
        assert -1.0 / top_k - eps <= r <= -1.0 / k + eps


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(1, 8), st.integers(1, 3), st.integers(0, 2**16))
def test_degenerate_properties(m, d, rank, seed):
    # rank-deficient with repeated singular values
    rank = min(rank, m, d)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, d, generator=g, dtype=torch.float64)
    for z in (a @ b, torch.zeros(m, d, dtype=torch.float64), torch.ones(m, d, dtype=torch.float64)):
        z = z.requires_grad_(True)
        total = (
            NF.covariance_loss(z) + NF.singular_value_loss(z) + NF.singular_value_entropy(z)
            + NF.largest_singular_value_ratio(z)
        )
        (grad,) = torch.autograd.grad(total, z)
        assert torch.isfinite(total) and torch.isfinite(grad).all()
