"""Every public operation on every device and dtype (``BaseTester``; ``--device``, ``--dtype``).

On a machine without a GPU the ``cuda`` cases are skipped with the reason; on one with a
GPU the same tests run there (``pytest --device cuda --dtype all``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nmtune.functional as NF
import reference as ref
from base_tester import TOLERANCES, BaseTester, features, value_and_grad
from nmtune import NMTuneConfig, NMTuneHead, NMTuneLoss, NMTuneRegularizer
from nmtune.testing import HostSyncCounter

# (M, D) on both Gram sides, square, degenerate widths, and stacks (..., M, D)
SHAPES = [(8, 32), (40, 6), (16, 16), (2, 5), (7, 1), (3, 10, 20), (2, 2, 12, 5)]
GRADCHECK_SHAPES = [(5, 7), (7, 3), (2, 4, 3)]
HALF = [torch.float16, torch.bfloat16]


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def _finite_error(fn, device):
    bad = features(4, 3, device=device)
    bad[1, 2], bad[0, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 Inf.*check_finite=False"):
        fn(bad)
    try:  # the flag turns the (syncing) check off: NaN out, or a clear error where LAPACK fails on them
        assert not torch.isfinite(fn(bad, check_finite=False)).all()
    except ValueError as err:
        assert "NaN/Inf values (not checked because check_finite=False)" in str(err)


def _input_errors(fn, device, dtype, finite_fn=None):
    """The errors every spectral entry point shares: shape, type, NaN/Inf and precision."""
    _shape_errors(fn)
    _finite_error(finite_fn or fn, device)
    with pytest.raises(ValueError, match="precision.*'float16'"):
        fn(features(4, 3, device=device, dtype=dtype), precision="float16")


def _shape_errors(fn):
    with pytest.raises(ValueError, match=r"1 row\(s\).*at least 2.*\(1, 768\)"):
        fn(torch.randn(1, 768))
    with pytest.raises(ValueError, match=r"at least 2 dims; got shape \(5,\)"):
        fn(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        fn(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([[1.0, 2.0], [3.0, 4.0]])


class TestCovarianceLoss(BaseTester):
    def test_smoke(self, device, dtype):
        out = NF.covariance_loss(features(16, 8, device=device, dtype=dtype))
        assert out.shape == () and out.dtype == _result_dtype(dtype) and out.device.type == device.type and out >= 0

    def test_exception(self, device, dtype):
        _input_errors(NF.covariance_loss, device, dtype)

    def test_cardinality(self, device, dtype):
        for shape in SHAPES:
            assert NF.covariance_loss(features(*shape, device=device, dtype=dtype)).shape == shape[:-2]

    @pytest.mark.parametrize("precision", ["float64", "float32"])
    def test_reference(self, device, dtype, precision):
        for shape in SHAPES:
            z = features(*shape, device=device, dtype=dtype)
            value, grad = value_and_grad(lambda t: NF.covariance_loss(t, precision=precision), z)
            expected, expected_grad = value_and_grad(ref.covariance, z.double().cpu())
            tol = TOLERANCES[dtype] if precision == "float64" else (1e-4, 1e-4)  # a float32 Gram product
            tol = (max(tol[0], TOLERANCES[dtype][0]), max(tol[1], TOLERANCES[dtype][1]))
            self.assert_close(value, expected, rtol=tol[0], atol=tol[1])
            self.assert_close(grad, expected_grad, rtol=tol[0], atol=tol[1])

    def test_gradcheck(self, device):
        for shape in GRADCHECK_SHAPES:
            assert self.gradcheck(lambda z: NF.covariance_loss(z, precision="float64"), features(*shape, device=device))

    def test_dynamo(self, device, dtype):
        z = features(12, 20, device=device, dtype=dtype)
        fn = self.compiled(lambda t: NF.covariance_loss(t, check_finite=False))
        self.assert_close(fn(z), NF.covariance_loss(z), rtol=1e-6, atol=1e-8)

    def test_known_value(self, device):
        z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], device=device)
        assert float(NF.covariance_loss(z)) == pytest.approx(0.0, abs=1e-7)  # diagonal covariance


class TestSingularValueLoss(BaseTester):
    def test_smoke(self, device, dtype):
        out = NF.singular_value_loss(features(16, 8, device=device, dtype=dtype))
        assert out.shape == () and out.dtype == _result_dtype(dtype) and -1.0 <= float(out) <= -1.0 / 8

    def test_exception(self, device, dtype):
        _input_errors(NF.singular_value_loss, device, dtype)
        with pytest.raises(ValueError, match=r"top_k must be in \[1, min\(M, D\)\] = \[1, 3\].*got 4"):
            NF.singular_value_loss(features(8, 3, device=device, dtype=dtype), 4)

    def test_cardinality(self, device, dtype):
        for shape in SHAPES:
            assert NF.singular_value_loss(features(*shape, device=device, dtype=dtype)).shape == shape[:-2]

    @pytest.mark.parametrize("top_k", [1, 2])
    def test_reference(self, device, dtype, top_k):
        for shape in (s for s in SHAPES if top_k <= min(s[-2:])):
            z = features(*shape, device=device, dtype=dtype, seed=1)
            value, grad = value_and_grad(lambda t: NF.singular_value_loss(t, top_k), z)
            expected, expected_grad = value_and_grad(lambda t: ref.ratio(t, top_k), z.double().cpu())
            self.assert_close(value, expected, dtype=dtype)
            self.assert_close(grad, expected_grad, rtol=100 * TOLERANCES[dtype][0], atol=100 * TOLERANCES[dtype][1])

    def test_gradcheck(self, device):
        for shape in GRADCHECK_SHAPES:
            assert self.gradcheck(lambda z: NF.singular_value_loss(z, 2), features(*shape, device=device, seed=5))

    def test_dynamo(self, device, dtype):
        z = features(12, 20, device=device, dtype=dtype)
        fn = self.compiled(lambda t: NF.singular_value_loss(t, 2, check_finite=False))
        self.assert_close(fn(z), NF.singular_value_loss(z, 2), rtol=1e-6, atol=1e-8)

    def test_float64_spectrum_is_accurate_on_a_decaying_spectrum(self, device):
        # Singular values decaying geometrically to 1e-6: a float32 Gram loses the tail.
        m, d = 64, 256
        g = torch.Generator().manual_seed(0)
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=torch.float64))
        z = (u * torch.logspace(0, -6, m, dtype=torch.float64)) @ v.T
        value, grad = value_and_grad(NF.singular_value_loss, z.float().to(device))
        expected, expected_grad = value_and_grad(ref.ratio, z)
        assert abs(float(value) - float(expected)) / abs(float(expected)) <= 1e-6
        rel = float((grad.double().cpu() - expected_grad).norm() / expected_grad.norm())
        assert rel <= 1e-3
        # the fast path is measurably worse, which is why float64 is the default
        _, g32 = value_and_grad(lambda t: NF.singular_value_loss(t, precision="float32"), z.float().to(device))
        assert float((g32.double().cpu() - expected_grad).norm() / expected_grad.norm()) > rel


class TestSpectrum(BaseTester):
    """``singular_values`` and the metrics on it: SVE, LSVR, effective rank."""

    METRICS = [(NF.singular_value_entropy, ref.sve), (NF.largest_singular_value_ratio, ref.lsvr)]

    def test_smoke(self, device, dtype):
        z = features(16, 8, device=device, dtype=dtype)
        sigma = NF.singular_values(z)
        assert sigma.shape == (8,) and sigma.dtype == _result_dtype(dtype) and bool((sigma[:-1] >= sigma[1:]).all())
        assert 0 <= float(NF.singular_value_entropy(z)) <= math.log(8) + 1e-6
        assert 1 <= float(NF.effective_rank(z)) <= 8 + 1e-5

    def test_exception(self, device, dtype):
        _input_errors(NF.singular_values, device, dtype, finite_fn=NF.singular_value_entropy)

    def test_cardinality(self, device, dtype):
        z = features(8, 32, 48, device=device, dtype=dtype)
        batched = NF.singular_values(z)
        assert batched.shape == (8, 32)
        self.assert_close(batched, torch.stack([NF.singular_values(m) for m in z]), rtol=1e-6, atol=1e-6)
        for shape in SHAPES:
            assert NF.largest_singular_value_ratio(features(*shape, device=device, dtype=dtype)).shape == shape[:-2]

    def test_reference(self, device, dtype):
        for shape in SHAPES:
            z = features(*shape, device=device, dtype=dtype, seed=2)
            self.assert_close(NF.singular_values(z), ref.singular_values(z.double().cpu()), dtype=dtype)
            self.assert_close(NF.effective_rank(z), ref.sve(z.double().cpu()).exp(), dtype=dtype)
            for mine, theirs in self.METRICS:
                value, grad = value_and_grad(mine, z)
                expected, expected_grad = value_and_grad(theirs, z.double().cpu())
                self.assert_close(value, expected, dtype=dtype)
                self.assert_close(grad, expected_grad, rtol=100 * TOLERANCES[dtype][0],
                                  atol=100 * TOLERANCES[dtype][1])

    def test_gradcheck(self, device):
        for shape in GRADCHECK_SHAPES:
            for fn, _ in self.METRICS:
                assert self.gradcheck(fn, features(*shape, device=device, seed=5))

    def test_dynamo(self, device, dtype):
        z = features(12, 20, device=device, dtype=dtype)
        fn = self.compiled(lambda t: NF.singular_value_entropy(t, check_finite=False))
        self.assert_close(fn(z), NF.singular_value_entropy(z), rtol=1e-6, atol=1e-8)

    def test_known_values(self, device):
        eye = torch.eye(4, device=device)
        assert math.isclose(float(NF.singular_value_entropy(eye)), math.log(4), rel_tol=1e-6)
        assert math.isclose(float(NF.effective_rank(eye)), 4.0, rel_tol=1e-6)
        assert float(NF.largest_singular_value_ratio(torch.ones(5, 3, device=device))) == pytest.approx(0.0, abs=1e-7)


class TestConsistencyLoss(BaseTester):
    def test_smoke(self, device, dtype):
        f = features(32, 64, device=device, dtype=dtype)
        out = NF.consistency_loss(f * 3.0, f)
        assert out.shape == () and out.dtype == _result_dtype(dtype) and float(out) == pytest.approx(0.0, abs=1e-3)

    def test_exception(self, device, dtype):
        z = features(4, 3, device=device, dtype=dtype)
        with pytest.raises(ValueError, match=r"same shape.*\(4, 3\).*\(4, 5\)"):
            NF.consistency_loss(z, features(4, 5, device=device, dtype=dtype))
        with pytest.raises(ValueError, match="reduction.*'avg'"):
            NF.consistency_loss(z, z, reduction="avg")
        with pytest.raises(ValueError, match="mode.*'l2'"):
            NF.consistency_loss(z, z, mode="l2")
        _finite_error(lambda t, **kw: NF.consistency_loss(t, torch.ones_like(t), **kw), device)

    def test_cardinality(self, device, dtype):
        for shape in [(8, 32), (40, 6), (3, 10, 20)]:
            z, f = features(*shape, device=device, dtype=dtype), features(*shape, device=device, dtype=dtype, seed=1)
            per_row = NF.consistency_loss(z, f, reduction="none")
            assert per_row.shape == shape[:-1] and NF.consistency_loss(z, f).shape == ()
            self.assert_close(NF.consistency_loss(z, f, reduction="sum"), per_row.sum(), rtol=1e-6, atol=1e-6)

    def test_reference(self, device, dtype):
        for shape in [(8, 32), (40, 6), (3, 10, 20)]:
            z, f = features(*shape, device=device, dtype=dtype, seed=3), features(*shape, device=device, dtype=dtype, seed=4)
            value, grad = value_and_grad(lambda t: NF.consistency_loss(t, f), z)
            expected, expected_grad = value_and_grad(lambda t: ref.consistency(t, f.double().cpu()), z.double().cpu())
            tol = (1e-7, 1e-9) if dtype == torch.float64 else TOLERANCES[dtype]  # computed in >= float32
            self.assert_close(value, expected, rtol=tol[0], atol=tol[1])
            self.assert_close(grad, expected_grad, rtol=tol[0], atol=tol[1])
            self.assert_close(NF.consistency_loss(z, f, mode="element"), expected / shape[-1], rtol=tol[0], atol=tol[1])

    def test_gradcheck(self, device):
        for shape in GRADCHECK_SHAPES:
            assert self.gradcheck(lambda z: NF.consistency_loss(z, torch.ones_like(z)), features(*shape, device=device))

    def test_dynamo(self, device, dtype):
        z, f = features(12, 20, device=device, dtype=dtype), features(12, 20, device=device, dtype=dtype, seed=1)
        fn = self.compiled(lambda a, b: NF.consistency_loss(a, b, check_finite=False))
        self.assert_close(fn(z, f), NF.consistency_loss(z, f), rtol=1e-6, atol=1e-8)

    def test_zero_rows_normalise_to_zero(self, device):
        z, f = features(3, 5, device=device, dtype=torch.float64), features(3, 5, device=device, dtype=torch.float64, seed=4)
        z[0] = 0.0  # distance ||0 - f/||f|| ||^2 = 1, no gradient through a zero row
        f[1] = 0.0  # distance ||z/||z|| - 0||^2 = 1, and the gradient is tangent to the sphere: zero
        per_row, grad = value_and_grad(lambda t: NF.consistency_loss(t, f, reduction="none"), z)
        self.assert_close(per_row[:2], torch.ones(2, dtype=torch.float64))
        self.assert_close(grad[:2], torch.zeros(2, 5, dtype=torch.float64))
        _, expected = value_and_grad(lambda t: ref.consistency(t, f[2:].cpu()), z[2:].cpu())  # one row: its distance
        self.assert_close(grad[2:], expected)

    def test_detaches_the_reference(self, device):
        z = features(6, 4, device=device).requires_grad_(True)
        f = features(6, 4, device=device, seed=9).requires_grad_(True)
        NF.consistency_loss(z, f).backward()
        assert z.grad is not None and f.grad is None


@pytest.mark.parametrize("half", HALF, ids=["float16", "bfloat16"])
def test_half_inputs_upcast_and_return_float32(device, half):
    """Reductions of half-precision inputs come back in float32 (a float16 sum overflows), as PyTorch's
    losses do under autocast; the gradient keeps the input's dtype."""
    z32 = features(32, 48, device=device, seed=6)
    z = z32.to(half)
    for fn in (NF.covariance_loss, NF.singular_value_loss, NF.singular_value_entropy):
        out = fn(z)
        assert out.dtype == torch.float32
        BaseTester.assert_close(out, fn(z.float()), rtol=2e-2, atol=2e-3)
    zr = z.clone().requires_grad_(True)
    NF.singular_value_loss(zr).backward()
    assert zr.grad.dtype == half and torch.isfinite(zr.grad.float()).all()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert torch.isfinite(NF.covariance_loss(z32)).all()


def _pair(m, d, *lead, device="cpu", dtype=torch.float64, seed=0):
    f = features(*lead, m, d, device=device, dtype=dtype, seed=seed)
    return f + 0.3 * features(*lead, m, d, device=device, dtype=dtype, seed=seed + 100), f


def _reference_regularizer(cfg: NMTuneConfig):
    def reference(t, f):
        mse = ref.consistency(t, f) / (t.shape[-1] if cfg.consistency_mode == "element" else 1)
        return cfg.lambda_ * (
            cfg.consistency_weight * mse
            + cfg.covariance_weight * ref.covariance(t).mean()
            + cfg.singular_value_weight * ref.ratio(t, cfg.top_k).mean()  # stacks: the mean over matrices
        )

    return reference


class TestNMTuneRegularizer(BaseTester):
    def test_smoke(self, device, dtype):
        z, f = _pair(16, 8, device=device, dtype=dtype)
        out = NMTuneRegularizer()(z, f)
        assert out.shape == () and out.dtype == _result_dtype(dtype) and torch.isfinite(out)
        parts = NMTuneRegularizer()(z, f, return_components=True)
        assert parts.loss.dtype == _result_dtype(dtype) and all(v.device.type == device.type for v in parts.as_dict().values())

    def test_exception(self, device, dtype):
        reg = NMTuneRegularizer()
        z, f = _pair(8, 4, device=device, dtype=dtype)
        with pytest.raises(ValueError, match="needs the reference features f"):
            reg(z)
        assert torch.isfinite(NMTuneRegularizer(consistency_weight=0.0)(z))
        with pytest.raises(ValueError, match=r"z \(8, 4\) and f \(8, 5\)"):
            reg(z, features(8, 5, device=device, dtype=dtype))
        with pytest.raises(ValueError, match=r"1 row\(s\)"):
            reg(z[:1], f[:1])
        with pytest.raises(ValueError, match=r"top_k.*\[1, 3\].*got 5"):
            NMTuneRegularizer("paper", top_k=5)(z[:, :3], f[:, :3])  # "official" averages what exists
        bad = z.clone()
        bad[0, 0] = float("inf")
        with pytest.raises(ValueError, match="Inf"):
            reg(bad, f)
        bad[1, 1] = float("nan")
        with pytest.raises(ValueError, match=r"NaN/Inf values \(not checked because check_finite=False\)"):
            NMTuneRegularizer(check_finite=False)(bad, f)
        with pytest.raises(ValueError, match="gather_distributed"):  # needs an initialised process group
            NMTuneRegularizer(gather_distributed=True)(z, f)

    def test_cardinality(self, device, dtype):
        for lead in [(), (3,), (2, 2)]:
            z, f = _pair(12, 7, *lead, device=device, dtype=dtype)
            parts = NMTuneRegularizer(top_k=2)(z, f, return_components=True)
            assert parts.loss.shape == () and parts.sve.shape == ()  # the mean over the stacked matrices

    @pytest.mark.parametrize("preset", ["paper", "official"])
    def test_reference(self, device, dtype, preset):
        cfg = NMTuneConfig.from_preset(preset)
        # M < D, M > D (the D x D side), square, and stacks of each side
        for m, d, lead in [(24, 40, ()), (40, 24, ()), (16, 16, ()), (7, 12, (3,)), (12, 7, (2, 2))]:
            z, f = _pair(m, d, *lead, device=device, dtype=dtype)
            value, grad = value_and_grad(lambda t: NMTuneRegularizer(cfg)(t, f), z)
            reference = _reference_regularizer(cfg)
            expected, expected_grad = value_and_grad(lambda t: reference(t, f.double().cpu()), z.double().cpu())
            self.assert_close(value, expected, dtype=dtype)
            self.assert_close(grad, expected_grad, rtol=100 * TOLERANCES[dtype][0], atol=100 * TOLERANCES[dtype][1])

    def test_gradcheck(self, device):
        z, f = _pair(6, 5, device=device)
        assert self.gradcheck(lambda t: NMTuneRegularizer("official", top_k=2)(t, f), z)

    @pytest.mark.parametrize("precision, shape", [("float64", (16, 24)), ("float32", (24, 8)), ("float64", (3, 10, 6))])
    def test_dynamo(self, device, dtype, precision, shape):
        reg = NMTuneRegularizer("official", precision=precision, check_finite=False, top_k=2)
        z, f = _pair(shape[-2], shape[-1], *shape[:-2], device=device, dtype=dtype)
        compiled = self.compiled(reg)
        value, grad = value_and_grad(lambda t: compiled(t, f), z)
        expected, expected_grad = value_and_grad(lambda t: reg(t, f), z)
        self.assert_close(value, expected, rtol=1e-6, atol=1e-8)
        self.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
        parts = self.compiled(lambda a, b: reg(a, b, return_components=True))(z, f)
        self.assert_close(parts.sve, reg(z, f, return_components=True).sve, rtol=1e-6, atol=1e-8)

    @pytest.mark.parametrize("half", HALF, ids=["float16", "bfloat16"])
    def test_half_features_upcast_once(self, device, half):
        """Half features: the regularizer comes back in float32, the gradient in the input dtype, and
        covariance and spectrum share one upcast copy of Z."""
        z, f = (t.to(half) for t in _pair(32, 64, device=device, dtype=torch.float32))
        zr = z.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = NMTuneRegularizer()(zr, f)
        loss.backward()
        assert loss.dtype == torch.float32 and zr.grad.dtype == half
        self.assert_close(loss, ref.regularizer(z.double().cpu(), f.double().cpu()), dtype=half)
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            NMTuneRegularizer(consistency_weight=0.0, check_finite=False)(z)
        copies = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [32, 64]]
        assert len(copies) == 1, [e.input_shapes for e in copies]


class TestNMTuneLoss(BaseTester):
    def _batch(self, device, dtype, m=32, d=16, c=5):
        z, f = _pair(m, d, device=device, dtype=dtype)
        logits = features(m, c, device=device, dtype=dtype, seed=7)
        return logits, torch.arange(m, device=device) % c, z, f

    def test_smoke(self, device, dtype):
        logits, y, z, f = self._batch(device, dtype)
        out = NMTuneLoss()(logits, y, z, f)
        assert out.shape == () and out.dtype == _result_dtype(dtype) and torch.isfinite(out)

    def test_exception(self, device, dtype):
        logits, y, z, f = self._batch(device, dtype, m=8, d=4, c=1)
        with pytest.raises(ValueError, match="scalar"):
            NMTuneLoss(task_loss=lambda a, b: (a - b) ** 2)(logits, logits, z, f)
        with pytest.raises(TypeError, match="callable"):
            NMTuneLoss(task_loss="ce")
        with pytest.raises(ValueError, match=r"logits has 7 row\(s\) but z has 8"):
            NMTuneLoss()(logits[:7], y[:7], z, f)

    def test_cardinality(self, device, dtype):
        z, f = _pair(16, 8, 3, device=device, dtype=dtype)  # e.g. three layers' features
        pred, target = features(16, 1, device=device, dtype=dtype), features(16, 1, device=device, dtype=dtype, seed=1)
        mse = nn.MSELoss()
        value = NMTuneLoss(task_loss=mse, top_k=2)(pred, target, z, f)
        zc, fc = z.double().cpu(), f.double().cpu()
        expected = mse(pred.double().cpu(), target.double().cpu()) + 0.01 * (
            ref.consistency(zc, fc) + ref.covariance(zc).mean() + ref.ratio(zc, 2).mean()
        )
        self.assert_close(value, expected, dtype=dtype)

    def test_reference(self, device, dtype):
        logits, y, z, f = self._batch(device, dtype)
        total = NMTuneLoss()(logits, y, z, f)
        expected = nn.functional.cross_entropy(logits.double().cpu(), y.cpu()) + ref.regularizer(
            z.double().cpu(), f.double().cpu())
        self.assert_close(total, expected, dtype=dtype)
        parts = NMTuneLoss()(logits, y, z, f, return_components=True)
        zc, fc = z.double().cpu(), f.double().cpu()
        for got, want in [(parts.consistency, ref.consistency(zc, fc)), (parts.covariance, ref.covariance(zc)),
                          (parts.singular_value, ref.ratio(zc)), (parts.sve, ref.sve(zc)), (parts.lsvr, ref.lsvr(zc))]:
            self.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def test_gradcheck(self, device):
        logits, y, z, f = self._batch(device, torch.float64, m=6, d=5, c=3)
        assert self.gradcheck(lambda lg, t: NMTuneLoss("official", top_k=2)(lg, y, t, f), logits, z)

    def test_dynamo(self, device, dtype):
        logits, y, z, f = self._batch(device, dtype)
        loss = NMTuneLoss("paper", check_finite=False)
        self.assert_close(self.compiled(loss)(logits, y, z, f), loss(logits, y, z, f), rtol=1e-6, atol=1e-8)

    def test_step_reads_no_tensor_value_on_the_host(self, device, dtype, monkeypatch):
        """A head step (forward, loss, backward) reads no tensor value on the host. On CUDA the check is
        ``set_sync_debug_mode("error")``, with the one sync PyTorch documents inside ``torch.linalg.eigh``
        (its solver error check) allowed; on CPU it is :class:`nmtune.testing.HostSyncCounter`."""
        head = NMTuneHead(64, 10).to(device, dtype)
        x = features(32, 64, device=device, dtype=dtype)
        y = torch.arange(32, device=device) % 10
        criterion = NMTuneLoss("paper", check_finite=False)

        def step():
            out = head(x)
            loss = criterion(out.logits, y, out.features, x)
            loss.backward()
            return loss.detach()

        step()  # warm up (lazy CUDA/cuBLAS/cuSOLVER initialisation may sync once)
        if device.type != "cuda":
            with HostSyncCounter() as syncs:
                step()
            assert syncs.count == 0, syncs.calls
            return
        calls = []

        def allow_sync(fn):
            def wrapper(*args, **kwargs):
                calls.append(fn.__name__)
                torch.cuda.set_sync_debug_mode("default")
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("error")

            return wrapper

        monkeypatch.setattr(torch.linalg, "eigh", allow_sync(torch.linalg.eigh))
        monkeypatch.setattr(torch.linalg, "eigvalsh", allow_sync(torch.linalg.eigvalsh))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert torch.isfinite(step())
            no_spectrum = NMTuneLoss("paper", singular_value_weight=0.0, check_finite=False)
            out = head(x)
            no_spectrum(out.logits, y, out.features, x).backward()  # consistency + covariance: no sync at all
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert calls == ["eigh"], calls  # one eigendecomposition in the checked step


class TestNMTuneHead(BaseTester):
    def test_smoke(self, device, dtype):
        head = NMTuneHead(16, 4).to(device, dtype)
        out = head(features(8, 16, device=device, dtype=dtype))
        assert out.logits.shape == (8, 4) and out.features.shape == (8, 16) and out.logits.dtype == dtype

    def test_exception(self, device, dtype):
        head = NMTuneHead(16, 4).to(device, dtype)
        with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\); got \(8, 15\)"):
            head(features(8, 15, device=device, dtype=dtype))
        with pytest.raises(TypeError, match="floating-point"):
            head(torch.ones(8, 16, dtype=torch.long, device=device))
        with pytest.raises(ValueError, match="linear probe"):
            NMTuneHead(16, 4, mlp=False, residual=True)
        with pytest.raises(TypeError, match="dropout must be a real number; got True"):
            NMTuneHead(16, 4, dropout=True)
        for flag in ("mlp", "batch_norm", "residual"):
            with pytest.raises(TypeError, match=f"{flag} must be a bool; got 'yes'"):
                NMTuneHead(16, 4, **{flag: "yes"})

    def test_cardinality(self, device, dtype):
        head = NMTuneHead.from_preset("official", 16, 4).to(device, dtype).eval()
        x = features(2, 3, 16, device=device, dtype=dtype)
        out = head(x)
        assert out.logits.shape == (2, 3, 4) and out.features.shape == (2, 3, 16)
        self.assert_close(out.features, head(x.reshape(6, 16)).features.reshape(2, 3, 16), rtol=1e-6, atol=1e-6)

    def test_reference(self, device, dtype):
        x = features(8, 16, device=device, dtype=dtype)
        probe = NMTuneHead(16, 4, mlp=False).to(device, dtype)
        assert torch.equal(probe(x).features, x)
        head = NMTuneHead.from_preset("official", 16, 4).to(device, dtype).eval()
        with torch.no_grad():
            head.scale.uniform_(0.5, 1.5)
            z = head.scale * head.mlp(x) + x  # the authors' residual: Z = s * MLP(F) + F
            self.assert_close(head(x).features, z, rtol=1e-6, atol=1e-6)
            self.assert_close(head(x).logits, head.classifier(z), rtol=1e-6, atol=1e-6)

    def test_gradcheck(self, device):
        head = NMTuneHead(5, 3, residual=True).to(device, torch.float64)
        assert self.gradcheck(lambda x: head(x).logits, features(4, 5, device=device))

    def test_dynamo(self, device, dtype):
        head = NMTuneHead(16, 4).to(device, dtype)
        x = features(8, 16, device=device, dtype=dtype)
        self.assert_close(self.compiled(head)(x).logits, head(x).logits, rtol=1e-6, atol=1e-8)
