"""``distributed_statistics`` = ``"gather"`` | ``"reduce"`` | ``"auto"`` on 2 and 4 real gloo ranks (CPU).

Each worker runs one DDP step of a linear feature map ``z = x A^T + b`` whose
features share a common mean 10^3 times their spread, under
``NMTuneRegularizer(gather_distributed=True)``, and saves the loss, the
components, the parameter gradients and the bytes its collectives handled
(:class:`nmtune.testing.CollectiveBytes`). The parent compares them with one
process on the concatenated batch: the global terms on every row, the local
consistency term as the per-rank mean averaged over ranks (DDP's objective).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from nmtune import NMTuneConfig, NMTuneRegularizer
from nmtune.distributed import STATISTICS_PATHS, global_statistics, statistics_path
from nmtune.functional import consistency_loss

D = 32
M_LOCAL = 128
RAGGED = (128, 97, 60, 131)
MEAN = 1e3  # the common mean, in units of the features' spread
BASE = dict(lambda_=1.0, consistency_weight=1.0, covariance_weight=1.0, singular_value_weight=1.0, top_k=1)


def _cases(world: int) -> dict[str, dict[str, Any]]:
    equal, ragged = (M_LOCAL,) * world, RAGGED[:world]
    cases: dict[str, dict[str, Any]] = {}
    for path in STATISTICS_PATHS:
        cases[f"{path}_equal"] = dict(sizes=equal, cfg=dict(distributed_statistics=path, equal_local_batches=True))
        cases[f"{path}_ragged"] = dict(sizes=ragged, cfg=dict(distributed_statistics=path))
    for path in ("gather", "reduce"):
        # top_k > 1 with the authors' two views (cat([weak, strong]) on every rank).
        cases[f"{path}_topk_views"] = dict(sizes=equal, views=2, cfg=dict(distributed_statistics=path, top_k=3))
        cases[f"{path}_float32"] = dict(
            sizes=equal, dtype=torch.float32, mean=3.0, cfg=dict(distributed_statistics=path, precision="float32")
        )
        # One row per rank: the global batch (world rows < D) is large enough, so "skip" skips nothing;
        # the reduce path then takes the top `world` of D eigenvalues.
        cases[f"{path}_skip_one_row"] = dict(
            sizes=(1,) * world, cfg=dict(distributed_statistics=path, small_batch="skip")
        )
        if world == 2:
            cases[f"{path}_fullgraph"] = dict(
                sizes=equal, compiled=True, cfg=dict(distributed_statistics=path, equal_local_batches=True)
            )
    return cases


def _data(sizes: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(sum(sizes), D, generator=g, dtype=torch.float64).to(dtype)


def _model(dtype: torch.dtype, mean: float) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(D, D, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(D) + 0.3 * torch.randn(D, D, generator=g))
        lin.bias.copy_(mean * (1.0 + 0.1 * torch.rand(D, generator=g)))
    return lin


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nmtune.testing import CollectiveBytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        for name, case in _cases(world).items():
            dtype, mean, sizes = case.get("dtype", torch.float64), case.get("mean", MEAN), case["sizes"]
            start = sum(sizes[:rank])
            x = _data(sizes, dtype)[start : start + sizes[rank]]
            model = DDP(_model(dtype, mean))
            reg = NMTuneRegularizer(**{**BASE, **case["cfg"]}, gather_distributed=True)
            if case.get("compiled"):
                torch._dynamo.reset()
                reg = torch.compile(reg, backend="aot_eager", fullgraph=True)
                parts = reg(model(x), x, views=case.get("views", 1), return_components=True)
                parts.loss.backward()
                fwd = bwd = None
            else:
                z = model(x)
                with CollectiveBytes() as fwd:
                    parts = reg(z, x, views=case.get("views", 1), return_components=True)
                with CollectiveBytes() as bwd:
                    parts.loss.backward()
            comps = {}
            for key, value in parts.as_dict().items():
                value = value.detach().clone()
                dist.all_reduce(value)
                comps[key] = value / world
            results[name] = {
                "parts": comps,
                "rank_loss": parts.loss.detach().clone(),
                "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()},
                "fwd": None if fwd is None else fwd.calls,
                "bwd": None if bwd is None else bwd.calls,
            }
        # A bad value reaches global_statistics' own check, on every rank, before any collective.
        try:
            global_statistics(torch.zeros(4, D), statistics="allreduce")
        except ValueError as exc:
            results["bad_value"] = str(exc)
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _one_process(case: dict[str, Any], world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Components and parameter gradients of DDP's objective, in one process on the concatenated batch."""
    dtype, mean, sizes, views = case.get("dtype", torch.float64), case.get("mean", MEAN), case["sizes"], case.get(
        "views", 1)
    cfg = {k: v for k, v in case["cfg"].items() if k not in ("distributed_statistics", "equal_local_batches")}
    x = _data(sizes, dtype)
    model = _model(dtype, mean)
    glob = NMTuneRegularizer(**{**BASE, **cfg, "consistency_weight": 0.0})
    # The local term through the function (BASE weighs it 1): a one-row NMTuneRegularizer under "skip"
    # would skip it, where under gather_distributed the global batch decides.
    consistency = sum(_local_consistency(model(xr), xr, views) for xr in x.split(list(sizes))) / world
    parts_glob = glob(model(x), return_components=True)
    loss = consistency + parts_glob.loss
    loss.backward()
    comps = parts_glob.as_dict()
    comps["consistency"] = consistency.detach()
    comps["loss"] = loss.detach()
    return comps, {k: p.grad.clone() for k, p in model.named_parameters()}


def _local_consistency(z: torch.Tensor, f: torch.Tensor, views: int) -> torch.Tensor:
    if views == 2:  # strong Z against weak F
        m = z.shape[-2]
        z, f = z[m // 2 :], f[: m // 2]
    return consistency_loss(z, f)


def _spawn(world: int, tmp: Any) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    return request.param, _spawn(request.param, tmp_path_factory.mktemp(f"ddp{request.param}"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.distributed
def test_every_path_gives_one_process_on_the_concatenated_batch(ranks: tuple[int, list[dict]]) -> None:
    world, results = ranks
    for name, case in _cases(world).items():
        ref, ref_grads = _one_process(case, world)
        tol = 1e-3 if case.get("dtype") == torch.float32 else 1e-9
        for r, res in enumerate(results):
            got = res[name]
            for key in ("loss", "consistency", "covariance", "singular_value", "sve", "lsvr", "skipped"):
                assert _rel(got["parts"][key], ref[key]) <= tol or float((got["parts"][key] - ref[key]).abs()) <= tol, (
                    f"{name}, rank {r}: {key} {float(got['parts'][key])} vs one process {float(ref[key])}"
                )
            # DDP averages the ranks' gradients; every rank holds that average. Relative to the whole
            # gradient: the bias's is a sum of per-row gradients that cancel to ~1e-6 of the weight's.
            names = sorted(ref_grads)
            flat = torch.cat([got["grads"][k].flatten() for k in names])
            ref_flat = torch.cat([ref_grads[k].flatten() for k in names])
            assert _rel(flat, ref_flat) <= tol, f"{name}, rank {r}: parameter gradients off by {_rel(flat, ref_flat)}"


@pytest.mark.distributed
def test_the_cases_exercise_what_they_claim(ranks: tuple[int, list[dict]]) -> None:
    """Guards the comparison above: a large common mean, a non-trivial spectral gradient, no skipping."""
    world, results = ranks
    for name in _cases(world):
        assert float(results[0][name]["parts"]["skipped"]) == 0.0, name
        assert float(results[0][name]["parts"]["covariance"]) > 0, name
    ref, grads = _one_process(_cases(world)["reduce_equal"], world)
    assert grads["bias"].norm() > 1e-6 * grads["weight"].norm()  # the spectrum sees the mean
    # The terms of the global batch are not those of a local one.
    local, _ = _one_process({**_cases(world)["reduce_equal"], "sizes": (M_LOCAL,)}, 1)
    assert _rel(local["covariance"], ref["covariance"]) > 1e-3


def _bytes(calls: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in calls:
        out[name] = out.get(name, 0) + n
    return out


@pytest.mark.distributed
def test_bytes_at_the_collectives(ranks: tuple[int, list[dict]]) -> None:
    """M_local = 128, D = 32 (float64): "auto" reduces a few D x D matrices, "gather" moves the rows twice."""
    world, results = ranks
    rows, dd = world * M_LOCAL, D * D * 8
    for res in results:
        gather_f, gather_b = _bytes(res["gather_equal"]["fwd"]), _bytes(res["gather_equal"]["bwd"])
        assert gather_f == {"all_gather": rows * D * 8}
        assert gather_b == {"reduce_scatter": rows * D * 8}  # not an all-reduce of the whole gradient
        reduce_f, reduce_b = _bytes(res["reduce_equal"]["fwd"]), _bytes(res["reduce_equal"]["bwd"])
        assert reduce_f == {"all_reduce": (D + D * D) * 8}  # the rows' sum, then the centred scatter
        assert reduce_b == {"all_reduce": (D + 1) * D * 8}  # [G + G^T; g]: no row-sized collective
        auto = sum(n for _, n in res["auto_equal"]["fwd"] + res["auto_equal"]["bwd"])
        gather = sum(n for _, n in res["gather_equal"]["fwd"] + res["gather_equal"]["bwd"])
        assert auto <= 3 * dd
        assert gather >= 4 * auto
        # Without the promise the ranks exchange their shapes first: a few int64s more.
        ragged = _bytes(res["auto_ragged"]["fwd"])
        assert ragged["all_gather"] == world * 2 * 8 and ragged["all_reduce"] == (D + D * D) * 8


@pytest.mark.distributed
def test_a_bad_value_raises_on_every_rank(ranks: tuple[int, list[dict]]) -> None:
    for res in ranks[1]:
        assert "distributed_statistics must be one of ('auto', 'gather', 'reduce'); got 'allreduce'" in res[
            "bad_value"]


def test_auto_rule_and_config_errors() -> None:
    assert statistics_path("auto", 256, 32) == "reduce"
    assert statistics_path("auto", 32, 32) == "gather"  # not more rows than D
    assert statistics_path("auto", 33, 32) == "reduce"
    assert statistics_path("gather", 10**6, 8) == "gather"
    assert statistics_path("reduce", 2, 768) == "reduce"
    assert NMTuneConfig().distributed_statistics == "auto"
    with pytest.raises(ValueError, match=r"distributed_statistics must be one of \('auto', 'gather', 'reduce'\); "
                                         r"got 'allreduce'"):
        NMTuneConfig(distributed_statistics="allreduce")
    with pytest.raises(TypeError, match="distributed_statistics.*got NoneType None"):  # a value of another type
        NMTuneRegularizer(distributed_statistics=None)
    with pytest.raises(ValueError, match="distributed_statistics.*got 'Reduce'"):
        statistics_path("Reduce", 10, 2)
    cfg = NMTuneConfig(distributed_statistics="reduce")
    assert NMTuneConfig.from_json(cfg.to_json()) == cfg
