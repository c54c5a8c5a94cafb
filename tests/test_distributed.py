"""Global-batch statistics under DDP, for real: 2 gloo ranks on CPU.

The workers run one DDP step of an ``NMTuneHead`` with
``NMTuneLoss(gather_distributed=True)`` and save what they saw; the parent
compares it with one process on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

import nmtune.distributed as ND
from nmtune import NMTuneHead, NMTuneLoss, NMTuneRegularizer
from nmtune.distributed import all_gather_rows, is_distributed
from nmtune.testing import HostSyncCounter

WORLD = 2
D, C = 6, 3
EQUAL = (5, 5)
UNEQUAL = (5, 3)


def _batch(seed: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, D, generator=g, dtype=torch.float64), torch.randint(0, C, (m,), generator=g)


def _head() -> NMTuneHead:
    torch.manual_seed(0)
    return NMTuneHead(D, C).double()


def _criterion(**kw) -> NMTuneLoss:
    # Larger weights than the paper's so that the global terms dominate the gradients.
    return NMTuneLoss("paper", lambda_=1.0, **kw)


def _no_exchange(*args: object) -> None:
    raise AssertionError("equal_local_batches=True must not exchange shapes")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result: dict[str, object] = {}
    try:
        cases = (
            ("equal", EQUAL, False, None),
            ("unequal", UNEQUAL, False, None),
            ("equal_promised", EQUAL, True, None),
            # torch.compile: without the shape exchange the loss compiles whole; with it, the
            # exchanged sizes are data-dependent and the gather runs behind a graph break.
            ("equal_promised_fullgraph", EQUAL, True, True),
            ("unequal_compiled", UNEQUAL, False, False),
        )
        for name, sizes, promise, fullgraph in cases:
            x, y = _batch(100 + rank, sizes[rank])
            model = DDP(_head())
            out = model(x)
            criterion = _criterion(gather_distributed=True, equal_local_batches=promise)
            if fullgraph is not None:
                torch._dynamo.reset()
                criterion = torch.compile(criterion, backend="aot_eager", fullgraph=fullgraph)
            exchange = ND._exchange_shapes
            if promise:  # the promise must skip the shape exchange (its host sync) entirely
                ND._exchange_shapes = _no_exchange
            try:
                # docs: the shape exchange is the gather's one host sync (eager steps only: the
                # counter's patches of Tensor would be traced by dynamo)
                syncs = HostSyncCounter()
                with syncs if fullgraph is None else contextlib.nullcontext():
                    loss = criterion(out.logits, y, out.features, x)
                    loss.backward()
            finally:
                ND._exchange_shapes = exchange
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            result[name] = {
                "loss": mean_loss / WORLD,
                "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
                "host_syncs": syncs.calls,
            }
        # Forward of the gather itself, with known sizes (no shape exchange) and without.
        x, _ = _batch(100 + rank, EQUAL[rank])
        result["gathered_known_sizes"] = all_gather_rows(x, sizes=list(EQUAL))
        x, _ = _batch(100 + rank, UNEQUAL[rank])
        result["gathered_unequal"] = all_gather_rows(x)
        # Gradient scaling of the raw gather: d/dx_r of sum_r' sum(W * gathered) = W-fold rows.
        x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
        (all_gather_rows(x) * torch.arange(12.0).reshape(4, 3)).sum().backward()
        result["gather_grad"] = x.grad.clone()
        # Disagreeing feature widths: a ValueError on every rank, not a hang.
        try:
            all_gather_rows(torch.zeros(3, 4 + rank))
        except ValueError as exc:
            result["width_error"] = str(exc)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _single_process(sizes: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective DDP optimises, in one process on the concatenated batch.

    Global terms (covariance, spectrum) see every row; the local terms (task
    loss, consistency) are means per rank, averaged over ranks -- which is the
    plain mean over the concatenated batch when the sizes are equal.
    """
    head = _head()
    batches = [_batch(100 + r, m) for r, m in enumerate(sizes)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if len(set(sizes)) == 1:
        out = head(x)
        loss = _criterion()(out.logits, y, out.features, x)
    else:
        local = NMTuneLoss("paper", lambda_=1.0, covariance_weight=0.0, singular_value_weight=0.0)
        glob = NMTuneRegularizer("paper", lambda_=1.0, consistency_weight=0.0)
        loss = sum(local(head(xr).logits, yr, head(xr).features, xr) for xr, yr in batches) / len(sizes)
        loss = loss + glob(head(x).features)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in head.named_parameters()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "case, sizes",
    [("equal", EQUAL), ("unequal", UNEQUAL), ("equal_promised", EQUAL), ("equal_promised_fullgraph", EQUAL),
     ("unequal_compiled", UNEQUAL)],
)
def test_ddp_matches_one_process_on_the_global_batch(ranks: list[dict], case: str, sizes: tuple[int, ...]) -> None:
    ref_loss, ref_grads = _single_process(sizes)
    for r, result in enumerate(ranks):
        # rtol 1e-6, not 1e-12: NMTuneRegularizer adds the consistency term as float32 (mse.float()).
        torch.testing.assert_close(result[case]["loss"], ref_loss, rtol=1e-6, atol=0, msg=f"rank {r}")
        for name, grad in ref_grads.items():
            torch.testing.assert_close(
                result[case]["grads"][name], grad, rtol=1e-8, atol=1e-12, msg=f"rank {r}, grad of {name}"
            )


@pytest.mark.distributed
def test_host_syncs_of_a_gathered_step(ranks: list[dict]) -> None:
    """docs/distributed.md and docs/architecture.md: with ``equal_local_batches=True`` a gathered step
    reads no value on the host; by default the shape exchange adds its one read (the loss's own
    ``check_finite`` adds another)."""
    for r, result in enumerate(ranks):
        assert result["equal_promised"]["host_syncs"] == ["__bool__"], f"rank {r}"  # check_finite only
        exchange = [c for c in result["equal"]["host_syncs"] if c != "__bool__"]
        assert exchange == ["tolist"] * WORLD, f"rank {r}: {result['equal']['host_syncs']}"


@pytest.mark.distributed
def test_local_statistics_differ_from_global(ranks: list[dict]) -> None:
    """Guards the test above against passing trivially: without the gather the grads differ."""
    head = _head()
    x, y = _batch(100, EQUAL[0])
    out = head(x)
    _criterion()(out.logits, y, out.features, x).backward()
    _, ref_grads = _single_process(EQUAL)
    assert not torch.allclose(head.mlp[0].weight.grad, ref_grads["mlp.0.weight"], rtol=1e-3)
    assert not torch.allclose(ranks[0]["equal"]["grads"]["mlp.0.weight"], head.mlp[0].weight.grad, rtol=1e-3)


@pytest.mark.distributed
def test_gather_forward_and_backward_scaling(ranks: list[dict]) -> None:
    for key, sizes in (("gathered_known_sizes", EQUAL), ("gathered_unequal", UNEQUAL)):
        expected = torch.cat([_batch(100 + r, m)[0] for r, m in enumerate(sizes)])
        for result in ranks:
            torch.testing.assert_close(result[key], expected, rtol=0, atol=0)
    # Each rank's loss is sum(W * gathered): the gradient of rank r's rows is summed over both ranks.
    weights = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
    for r, result in enumerate(ranks):
        torch.testing.assert_close(result["gather_grad"], WORLD * weights[2 * r : 2 * r + 2])


@pytest.mark.distributed
def test_disagreeing_shapes_raise_on_every_rank(ranks: list[dict]) -> None:
    for result in ranks:
        assert "width_error" in result, "a width mismatch across ranks must raise ValueError"
        assert "[(3, 4), (3, 5)]" in result["width_error"]


def test_gather_without_process_group_raises() -> None:
    assert not is_distributed()
    with pytest.raises(ValueError, match="init_process_group"):
        all_gather_rows(torch.randn(4, 3))
    reg = NMTuneRegularizer(gather_distributed=True)
    with pytest.raises(ValueError, match="gather_distributed"):
        reg(torch.randn(4, 3), torch.randn(4, 3))


def test_gather_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="list"):
        all_gather_rows([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        all_gather_rows(torch.randn(4))


def test_gather_with_one_rank_is_identity(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        z = torch.randn(4, 3, requires_grad=True)
        assert all_gather_rows(z) is z
    finally:
        dist.destroy_process_group()
