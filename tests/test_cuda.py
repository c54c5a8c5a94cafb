"""CUDA paths: host syncs, batched eigendecompositions, bf16 features upcast once.

The only host sync of a training step is the one PyTorch documents inside
``torch.linalg.eigh`` on CUDA (its solver error check); a step without the
spectral term has none.

Every test here needs a GPU and is skipped, with that reason, when none is
present (the project's CI machine has none; run them wherever one is).
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from nmtune import NMTuneHead, NMTuneLoss, NMTuneRegularizer
import nmtune.functional as NF

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here"),
]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")


def _step_under_sync_error(device: torch.device, criterion: NMTuneLoss) -> torch.Tensor:
    """One warm-up step, then one head step (forward, loss, backward) with syncs raising."""
    head = NMTuneHead(64, 10).to(device)
    x = torch.randn(32, 64, device=device)
    y = torch.randint(0, 10, (32,), device=device)

    def step() -> torch.Tensor:
        out = head(x)
        loss = criterion(out.logits, y, out.features, x)
        loss.backward()
        return loss.detach()

    step()  # warm up (lazy CUDA/cuBLAS/cuSOLVER init may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_without_spectrum_has_no_host_sync(device: torch.device) -> None:
    criterion = NMTuneLoss("paper", singular_value_weight=0.0, check_finite=False)  # consistency + covariance
    assert torch.isfinite(_step_under_sync_error(device, criterion))


def test_step_syncs_only_inside_torch_eigh(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch documents that ``torch.linalg.eigh`` synchronises with the host on CUDA (its
    solver error check). That one sync per step is allowed; any other sync raises."""
    calls: list[str] = []

    def allow_sync(fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(fn.__name__)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("default")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(mode)

        return wrapper

    monkeypatch.setattr(torch.linalg, "eigh", allow_sync(torch.linalg.eigh))
    monkeypatch.setattr(torch.linalg, "eigvalsh", allow_sync(torch.linalg.eigvalsh))
    loss = _step_under_sync_error(device, NMTuneLoss("paper", check_finite=False))
    assert torch.isfinite(loss)
    assert calls == ["eigh", "eigh"], calls  # warm-up and checked step: one eigendecomposition each


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_matches_reference_on_gpu(device: torch.device, precision: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 96, generator=g, dtype=torch.float64)
    f = z + 0.2 * torch.randn(64, 96, generator=g, dtype=torch.float64)
    leaf = z.clone().requires_grad_()
    expected = ref.regularizer(leaf, f)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    zc = z.float().to(device).requires_grad_()
    got = NMTuneRegularizer(precision=precision)(zc, f.float().to(device))
    got.backward()
    tol = 1e-6 if precision == "float64" else 1e-4
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=0)
    torch.testing.assert_close(zc.grad.double().cpu(), expected_grad, rtol=1e-3, atol=1e-6)


def test_batched_spectrum_matches_per_matrix(device: torch.device) -> None:
    z = torch.randn(8, 32, 48, device=device)
    batched = NF.singular_values(z)
    per = torch.stack([NF.singular_values(m) for m in z])
    torch.testing.assert_close(batched, per)
    torch.testing.assert_close(batched.double().cpu(), ref.singular_values(z.cpu()), rtol=1e-5, atol=1e-5)


def test_bfloat16_features_upcast_once_and_return_bf16(device: torch.device) -> None:
    z = torch.randn(32, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    f = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = NMTuneRegularizer()(z, f)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and z.grad.dtype == torch.bfloat16
    expected = ref.regularizer(z.detach().double().cpu(), f.double().cpu())
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-2, atol=1e-4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        NMTuneRegularizer(consistency_weight=0.0, check_finite=False)(z.detach())
    full_copies = [
        e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] == [32, 64]
    ]
    # Covariance + spectrum share one upcast of Z (verified on CPU: also exactly one there).
    assert len(full_copies) == 1, [e.input_shapes for e in full_copies]
