"""torch.compile(fullgraph=True) of an NMTune head step (each operation alone: tests/test_ops.py).

``fullgraph=True`` turns every graph break -- a ``.item()``, a Python branch on
a tensor value, an untraceable op -- into an error, so these tests double as
the proof that the training path never reads a tensor value on the host.
They use the ``aot_eager`` backend: Dynamo tracing and AOTAutograd (forward
and backward graphs, custom autograd functions included) exactly as inductor
sees them, without a C++ compile (inductor timings are in
benchmarks/bench_kernels.py --compile).
"""

from __future__ import annotations


import pytest
import torch

from nmtune import NMTuneHead, NMTuneLoss, NMTuneRegularizer

from nmtune.testing import HostSyncCounter

BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_check_finite_does_not_break_the_graph() -> None:
    """With the default check_finite=True the check is skipped while compiling."""
    compiled = torch.compile(NMTuneRegularizer(), fullgraph=True, backend=BACKEND)
    z = torch.randn(8, 16, requires_grad=True)
    compiled(z, torch.randn(8, 16)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_head_step_compiles_fullgraph_and_matches_eager() -> None:
    torch.manual_seed(0)
    head = NMTuneHead(32, 5)
    twin = NMTuneHead(32, 5)
    twin.load_state_dict(head.state_dict())
    criterion = NMTuneLoss("paper", check_finite=False)

    def loss_fn(model: NMTuneHead, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return criterion(out.logits, y, out.features, x)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=BACKEND)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (head, twin)]
    for step in range(3):
        x, y = torch.randn(16, 32), torch.randint(0, 5, (16,))
        losses = []
        for model, opt, fn in ((head, opts[0], loss_fn), (twin, opts[1], compiled)):
            opt.zero_grad()
            loss = fn(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], msg=f"step {step}")
    for (name, p), q in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_eager_head_step_reads_no_tensor_value() -> None:
    """The CPU stand-in for torch.cuda.set_sync_debug_mode('error') (tests/test_ops.py runs the CUDA check)."""
    head = NMTuneHead(16, 4)
    criterion = NMTuneLoss("paper", check_finite=False)
    x, y = torch.randn(12, 16), torch.randint(0, 4, (12,))
    with HostSyncCounter() as syncs:
        out = head(x)
        parts = criterion(out.logits, y, out.features, x, return_components=True)
        parts.loss.backward()
    assert syncs.count == 0, f"host reads in a step: {syncs.calls}"
    # The counter does see a read (guards against it being inert).
    with HostSyncCounter() as syncs:
        NMTuneLoss("paper")(out.logits.detach(), y, out.features.detach(), x)
    assert syncs.count >= 1
