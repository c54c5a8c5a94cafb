"""The functional API against the slow reference, properties, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmtune.functional as NF
import reference as ref

SHAPES = [(8, 32), (40, 6), (16, 16), (2, 5), (7, 1), (3, 10, 20), (2, 2, 12, 5)]


def _rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _grad(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    (g,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_covariance_matches_reference(shape, precision):
    z = _rand(shape)
    v, g = _grad(lambda t: NF.covariance_loss(t, precision=precision), z)
    rv, rg = _grad(ref.covariance, z)
    tol = 1e-10 if precision == "float64" else 1e-4
    torch.testing.assert_close(v, rv, rtol=tol, atol=tol)
    torch.testing.assert_close(g, rg, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("shape", "top_k"), [(s, k) for s in SHAPES for k in (1, 2) if k <= min(s[-2:])]
)
def test_ratio_matches_reference(shape, top_k):
    z = _rand(shape, seed=1)
    v, g = _grad(lambda t: NF.singular_value_loss(t, top_k), z)
    rv, rg = _grad(lambda t: ref.ratio(t, top_k), z)
    torch.testing.assert_close(v, rv, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_metrics_match_reference(shape):
    z = _rand(shape, seed=2)
    for mine, theirs in [
        (NF.singular_value_entropy, ref.sve),
        (NF.largest_singular_value_ratio, ref.lsvr),
    ]:
        v, g = _grad(mine, z)
        rv, rg = _grad(theirs, z)
        torch.testing.assert_close(v, rv, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(NF.effective_rank(z), ref.sve(z).exp())
    torch.testing.assert_close(NF.singular_values(z), ref.singular_values(z))


@pytest.mark.parametrize("shape", [(8, 32), (40, 6), (3, 10, 20)])
def test_consistency_matches_reference(shape):
    z, f = _rand(shape, seed=3), _rand(shape, seed=4)
    v, g = _grad(lambda t: NF.consistency_loss(t, f), z)
    rv, rg = _grad(lambda t: ref.consistency(t, f), z)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(g, rg)
    element = NF.consistency_loss(z, f, mode="element")
    torch.testing.assert_close(element, rv / shape[-1])
    per_row = NF.consistency_loss(z, f, reduction="none")
    assert per_row.shape == shape[:-1]
    torch.testing.assert_close(NF.consistency_loss(z, f, reduction="sum"), per_row.sum())


def test_consistency_zero_rows_normalise_to_zero():
    z = _rand((3, 5))
    f = _rand((3, 5), seed=4)
    z[0] = 0.0  # distance ||0 - f/||f|| ||^2 = 1, no gradient through a zero row
    f[1] = 0.0  # distance ||z/||z|| - 0||^2 = 1, and the gradient is tangent to the sphere: zero
    zr = z.clone().requires_grad_(True)
    per_row = NF.consistency_loss(zr, f, reduction="none")
    per_row.sum().backward()
    torch.testing.assert_close(per_row[:2], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(zr.grad[:2], torch.zeros(2, 5, dtype=torch.float64))
    _, expected = _grad(lambda t: ref.consistency(t, f[2:]), z[2:])  # one row: its distance
    torch.testing.assert_close(zr.grad[2:], expected)


def test_consistency_detaches_reference():
    z = _rand((6, 4)).requires_grad_(True)
    f = _rand((6, 4), seed=9).requires_grad_(True)
    NF.consistency_loss(z, f).backward()
    assert z.grad is not None and f.grad is None


def test_float64_spectrum_accuracy_on_decaying_spectrum():
    # Singular values decaying geometrically to 1e-6: a float32 Gram loses the tail.
    m, d = 64, 256
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -6, m, dtype=torch.float64)
    z = (u * s) @ v.T
    val, grad = _grad(lambda t: NF.singular_value_loss(t), z.float())
    rval, rgrad = _grad(ref.ratio, z)
    assert abs(float(val) - float(rval)) / abs(float(rval)) <= 1e-6
    rel = float((grad.double() - rgrad).norm() / rgrad.norm())
    assert rel <= 1e-3
    # and the fast path is measurably worse, which is why float64 is the default
    _, g32 = _grad(lambda t: NF.singular_value_loss(t, precision="float32"), z.float())
    assert float((g32.double() - rgrad).norm() / rgrad.norm()) > rel


@pytest.mark.parametrize(
    "fn",
    [
        lambda z: NF.covariance_loss(z, precision="float64"),
        lambda z: NF.singular_value_loss(z, 2),
        NF.singular_value_entropy,
        NF.largest_singular_value_ratio,
        lambda z: NF.consistency_loss(z, torch.ones_like(z)),
    ],
    ids=["cov", "ratio", "sve", "lsvr", "consistency"],
)
@pytest.mark.parametrize("shape", [(5, 7), (7, 3), (2, 4, 3)])
def test_gradcheck(fn, shape):
    z = _rand(shape, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_upcast_and_return_float32(dtype):
    # Reductions of half-precision inputs come back in float32 (issue 10.4: a float16 sum overflows),
    # as PyTorch's own losses do under autocast.
    z32 = _rand((32, 48), dtype=torch.float32, seed=6)
    z = z32.to(dtype)
    for fn in (NF.covariance_loss, NF.singular_value_loss, NF.singular_value_entropy):
        out = fn(z)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.float(), fn(z.float()), rtol=2e-2, atol=2e-3)
    zr = z.clone().requires_grad_(True)
    NF.singular_value_loss(zr).backward()
    assert zr.grad.dtype == dtype and torch.isfinite(zr.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(NF.covariance_loss(z32)).all()


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


def test_known_values():
    assert math.isclose(float(NF.singular_value_entropy(torch.eye(4))), math.log(4), rel_tol=1e-6)
    assert math.isclose(float(NF.effective_rank(torch.eye(4))), 4.0, rel_tol=1e-6)
    assert float(NF.singular_value_loss(torch.ones(5, 3))) == pytest.approx(-1.0)
    # diagonal covariance -> zero decorrelation loss
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(NF.covariance_loss(z)) == pytest.approx(0.0, abs=1e-7)


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


# ----------------------------------------------------------------------------
# errors


def test_errors_name_what_was_wrong():
    with pytest.raises(ValueError, match=r"1 row\(s\).*at least 2.*\(1, 768\)"):
        NF.covariance_loss(torch.randn(1, 768))
    with pytest.raises(ValueError, match=r"at least 2 dims; got shape \(5,\)"):
        NF.singular_values(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        NF.covariance_loss(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        NF.covariance_loss([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\).*\(4, 5\)"):
        NF.consistency_loss(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, min\(M, D\)\] = \[1, 3\].*got 4"):
        NF.singular_value_loss(torch.randn(8, 3), 4)
    with pytest.raises(ValueError, match="reduction.*'avg'"):
        NF.consistency_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="avg")
    with pytest.raises(ValueError, match="precision.*'float16'"):
        NF.singular_values(torch.randn(4, 3), precision="float16")
    bad = torch.randn(4, 3)
    bad[1, 2] = float("nan")
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 Inf.*check_finite=False"):
        NF.covariance_loss(bad)
    # the flag turns the (syncing) check off
    assert not torch.isfinite(NF.covariance_loss(bad, check_finite=False))
