"""Global-batch statistics under data parallelism.

``L_COV`` and ``L_SVD`` are *batch* statistics: under
``DistributedDataParallel`` each rank only sees ``M / world_size`` rows, so
the covariance and the spectrum of a local batch differ from those of the
global batch (the spectrum has at most ``M_local`` non-zero singular values).
:func:`all_gather_rows` concatenates the rows of every rank's features so that
each rank computes the statistics of the global batch, and it does so inside
autograd:

* forward: ``all_gather`` along the row dimension (``-2``);
* backward: ``reduce_scatter(SUM)`` of the gradient of the gathered tensor:
  this rank's slice of it, summed over ranks.

Why a sum: every rank evaluates the same global statistic ``R(Z_global)`` and
the training objective DDP optimises is the *mean over ranks* of the per-rank
losses. The gradient of ``(1/W) sum_r R(Z_global)`` with respect to rank
``r``'s rows is ``(1/W) sum_{r'} dR/dZ_r`` -- the sum across ranks is done
here, the ``1/W`` by DDP's gradient averaging. The parameter gradients after
DDP are then those of one process running the concatenated batch. A raw
``dist.all_gather`` (no gradient) or an ``all_reduce`` inside the loss gives
``1 / world_size``-scaled or missing gradients instead.

:class:`nmtune.NMTuneRegularizer` uses this when its config has
``gather_distributed=True``; the consistency term stays local.

Every statistic of ``L_COV`` and ``L_SVD`` is a function of the global mean and
the ``D x D`` scatter of the rows about it, so when the global batch has more
rows than ``D`` it is cheaper to all-reduce those than to gather the rows:
:func:`all_reduce_moments` (``distributed_statistics="reduce"``). It all-reduces
the rows' sum (the global mean follows from the global row count), then each
rank's scatter about that global mean: the centring happens before the ``D x D``
product, so a common mean far larger than the spread cancels nowhere (the
exactness of the single-process kernel). Its backward all-reduces the
``(D + 1) x D`` gradient of the statistics and forms this rank's rows' gradient
locally: no row-sized collective. :func:`global_statistics` picks the path
(``"auto"``: reduce when ``M_global > D``) and is what the regularizer calls.
The gather's backward reduce-scatters the gradient of the gathered rows: each
rank receives only its own slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from nmtune import _kernels
from nmtune._kernels import Moments
from nmtune._validation import check_choice

__all__ = ["all_gather_rows", "all_reduce_moments", "global_statistics", "statistics_path", "is_distributed",
           "STATISTICS_PATHS"]

#: The values of ``NMTuneConfig.distributed_statistics``.
STATISTICS_PATHS = ("auto", "gather", "reduce")


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a process group is initialised.

    Example:
        >>> is_distributed()  # a plain Python process
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _require_process_group(who: str) -> None:
    if not is_distributed():
        raise ValueError(
            f"{who} (NMTuneConfig.gather_distributed=True) needs an initialised torch.distributed "
            "process group, and none is initialised. Launch with torchrun or `accelerate launch` and call "
            "torch.distributed.init_process_group(...) (Accelerator() does this) before the first step, "
            "or set gather_distributed=False for single-process training."
        )


def _exchange_shapes(x: Tensor, group: Any, world_size: int) -> list[tuple[int, ...]]:
    """Every rank's ``x.shape`` (one small collective and one host sync)."""
    import torch.distributed as dist

    shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape, group=group)
    return [tuple(int(v) for v in s.tolist()) for s in shapes]


class _AllGatherRows(torch.autograd.Function):
    """Row concatenation across ranks; the backward sums gradients over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, sizes: tuple[int, ...], rank: int) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        x = x.contiguous()
        biggest = max(sizes)
        if biggest != x.shape[-2]:
            pad = x.new_zeros(*x.shape[:-2], biggest - x.shape[-2], x.shape[-1])
            x = torch.cat([x, pad], dim=-2)
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=group)
        if biggest != min(sizes):
            parts = [p.narrow(-2, 0, n) for p, n in zip(parts, sizes)]
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        import torch.distributed as dist

        # Reduce-scatter: rank r receives the sum over ranks of its own slice only
        # (M_r x D), not the whole M_global x D gradient an all-reduce would return.
        sizes, biggest = ctx.sizes, max(ctx.sizes)
        parts = []
        for part, n in zip(grad.split(list(sizes), dim=-2), sizes):
            if n != biggest:
                part = torch.cat([part, part.new_zeros(*part.shape[:-2], biggest - n, part.shape[-1])], dim=-2)
            parts.append(part.contiguous())
        out = torch.empty_like(parts[ctx.rank])
        dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=ctx.group)
        if biggest != sizes[ctx.rank]:
            out = out.narrow(-2, 0, sizes[ctx.rank])
        return out, None, None, None


def all_gather_rows(x: Tensor, *, group: Any = None, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate the rows (dim ``-2``) of ``x`` from every rank, differentiably.

    Rank ``r``'s rows come ``r``-th, so every rank holds the same global batch
    ``(..., sum_r M_r, D)``. The backward sums the gradient of the gathered
    tensor over ranks and returns this rank's slice (one reduce-scatter); combined with DDP's
    gradient averaging, the parameter gradients equal those of one process on
    the concatenated batch (see the module docstring).

    Every rank must call this (it is a collective), in the same order, once
    per forward and once per backward.

    Args:
        x: This rank's features ``(..., M_r, D)``; the leading dims and ``D``
            must agree across ranks.
        group: Process group (default: the world).
        sizes: Every rank's ``M_r``, when known in advance. ``None`` (the
            default) exchanges the shapes first: one small ``all_gather`` and
            one host synchronisation per call, which makes unequal local
            batches (a last, short batch) work and turns any disagreement of
            the other dims into a ``ValueError`` on every rank. Pass
            ``sizes=[M] * world_size`` for equal batches (``DistributedSampler``
            pads ranks to equal length) to skip that synchronisation.

    Returns:
        The global batch, ``(..., sum_r M_r, D)``; ``x`` itself when the world
        has one rank.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``torch.distributed`` is not initialised, ``x`` has fewer than
            2 dims, or the ranks' shapes or ``sizes`` disagree.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)
        >>> z = torch.randn(8, 4, requires_grad=True)
        >>> all_gather_rows(z).shape
        torch.Size([8, 4])
        >>> dist.destroy_process_group()
    """
    world_size = _check_rows(x, "all_gather_rows", group)
    if world_size == 1:
        return x
    return _AllGatherRows.apply(x, group, _row_counts(x, group, world_size, sizes, "all_gather_rows"),
                                _rank(group))


def _rank(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def _check_rows(x: object, who: str, group: Any) -> int:
    """Validate ``x`` as ``(..., M, D)`` and the process group; returns the world size."""
    import torch.distributed as dist

    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., M, D); got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., M, D) with at least 2 dims; got shape {tuple(x.shape)}")
    _require_process_group(who)
    return dist.get_world_size(group)


def _row_counts(x: Tensor, group: Any, world_size: int, sizes: Sequence[int] | None, who: str) -> tuple[int, ...]:
    """Every rank's ``M_r``: ``sizes`` checked against this rank, or exchanged (one host sync)."""
    rank = _rank(group)
    if sizes is None:
        shapes = _exchange_shapes(x, group, world_size)
        other = [s[:-2] + s[-1:] for s in shapes]
        if any(o != other[0] for o in other):
            raise ValueError(
                f"{who} needs the same leading dims and feature width D on every rank; got shapes "
                f"{shapes} (rank order)"
            )
        return tuple(s[-2] for s in shapes)
    row_counts = tuple(int(n) for n in sizes)
    if len(row_counts) != world_size or row_counts[rank] != x.shape[-2]:
        raise ValueError(
            f"sizes must list every rank's row count ({world_size} entries, entry {rank} equal to this "
            f"rank's {x.shape[-2]} rows); got {list(sizes)!r}"
        )
    return row_counts


class _AllReduceMoments(torch.autograd.Function):
    """The global mean and centred ``D x D`` scatter of the rows of every rank.

    Forward, in the compute dtype: all-reduce the column sums (``(..., 1, D)``),
    divide by the global row count, centre the local rows about that global mean,
    all-reduce their ``D x D`` scatter. Backward: with ``G`` the gradient of the
    scatter and ``g`` that of the mean, the gradient of the rows ``x_i`` of every
    rank's objective is ``(x_i - mean)(G + G^T) + g / M`` summed over ranks (the path
    through the mean inside the scatter vanishes: the centred rows sum to zero
    globally). Only the ``(D + 1) x D`` block ``[G + G^T; g]`` is all-reduced.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, rows: int, dtype: torch.dtype):  # type: ignore[override]
        import torch.distributed as dist

        with torch.autocast(device_type=x.device.type, enabled=False):
            xc = x.to(dtype)
            total = xc.sum(dim=-2, keepdim=True)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            mean = total / rows
            xc = xc - mean
            scatter = xc.mT @ xc
            dist.all_reduce(scatter, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(xc)
        ctx.group, ctx.rows, ctx.in_dtype = group, rows, x.dtype
        return mean, scatter

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean: Tensor | None, g_scatter: Tensor | None):  # type: ignore[override]
        import torch.distributed as dist

        (xc,) = ctx.saved_tensors
        d = xc.shape[-1]
        lead = xc.shape[:-2]
        with torch.autocast(device_type=xc.device.type, enabled=False):
            # Every rank runs the same collective, whichever outputs its loss used.
            sym = xc.new_zeros(*lead, d, d) if g_scatter is None else (g_scatter + g_scatter.mT).to(xc.dtype)
            g = xc.new_zeros(*lead, 1, d) if g_mean is None else g_mean.to(xc.dtype)
            block = torch.cat([sym, g], dim=-2)
            dist.all_reduce(block, op=dist.ReduceOp.SUM, group=ctx.group)
            grad = (xc @ block[..., :d, :]).add_(block[..., d:, :], alpha=1.0 / ctx.rows)
        return grad.to(ctx.in_dtype), None, None, None


def all_reduce_moments(
    x: Tensor, *, group: Any = None, sizes: Sequence[int] | None = None, precision: str = "float64"
) -> Moments:
    """The global batch's mean and centred ``D x D`` scatter, differentiably, without gathering rows.

    The statistics are those of the rows of every rank concatenated, computed without
    forming that batch: two all-reduces in the forward (``D`` values, then ``D x D``),
    one of ``(D + 1) x D`` in the backward. Combined with DDP's gradient averaging, the
    parameter gradients equal those of one process on the concatenated batch, as with
    :func:`all_gather_rows`. Every rank must call this, in the same order.

    Args:
        x: This rank's features ``(..., M_r, D)``; the leading dims and ``D`` must
            agree across ranks (``M_r`` may differ).
        group: Process group (default: the world).
        sizes: Every rank's ``M_r`` if known (skips the shape exchange and its host
            sync), else ``None``; as in :func:`all_gather_rows`.
        precision: ``"float64"`` (default) or ``"float32"``: the dtype of the moments
            and of what is all-reduced (never below ``x``'s).

    Returns:
        :class:`~nmtune._kernels.Moments` of the global batch (``rows = sum_r M_r``),
        accepted by :func:`nmtune.functional.nmtune_terms` as ``statistics_of``.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``torch.distributed`` is not initialised, ``x`` has fewer than 2 dims,
            or the ranks' shapes or ``sizes`` disagree.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29513", rank=0, world_size=1)
        >>> mom = all_reduce_moments(torch.randn(8, 4, dtype=torch.float64))
        >>> mom.scatter.shape, mom.rows
        (torch.Size([4, 4]), 8)
        >>> dist.destroy_process_group()
    """
    world_size = _check_rows(x, "all_reduce_moments", group)
    rows = sum(_row_counts(x, group, world_size, sizes, "all_reduce_moments")) if world_size > 1 else x.shape[-2]
    return _reduce(x, group, rows, precision)


def _reduce(x: Tensor, group: Any, rows: int, precision: str) -> Moments:
    mean, scatter = _AllReduceMoments.apply(x, group, rows, _kernels.compute_dtype(x.dtype, precision))
    return Moments(mean, scatter, rows)


def statistics_path(statistics: str, rows: int, width: int) -> str:
    """The path ``distributed_statistics=statistics`` takes for a global batch of ``rows x width``.

    ``"auto"`` is ``"reduce"`` when ``rows > width`` (the ``D x D`` side is then the
    smaller Gram as well) and ``"gather"`` otherwise.

    Example:
        >>> statistics_path("auto", 256, 32), statistics_path("auto", 256, 768)
        ('reduce', 'gather')
    """
    check_choice("distributed_statistics", statistics, STATISTICS_PATHS)
    if statistics != "auto":
        return statistics
    return "reduce" if rows > width else "gather"


def global_statistics(
    x: Tensor,
    *,
    statistics: str = "auto",
    precision: str = "float64",
    equal_local_batches: bool = False,
    group: Any = None,
) -> Tensor | Moments:
    """What the covariance and spectrum of the global batch are taken from: rows or moments.

    The one step between a rank's features and the global statistics
    (:class:`nmtune.NMTuneRegularizer` with ``gather_distributed=True`` calls it):
    the ranks' row counts (promised by ``equal_local_batches`` or exchanged), the
    path (:func:`statistics_path`), then :func:`all_gather_rows` or
    :func:`all_reduce_moments`.

    Args:
        x: This rank's features ``(..., M_r, D)``.
        statistics: ``"auto"``, ``"gather"`` or ``"reduce"``.
        precision: The compute precision (the dtype of the reduced moments).
        equal_local_batches: Every rank has ``x.shape[-2]`` rows (no shape exchange).
        group: Process group (default: the world).

    Returns:
        The gathered rows ``(..., M_global, D)`` or their :class:`~nmtune._kernels.Moments`;
        ``x`` itself in a world of one process.
    """
    check_choice("distributed_statistics", statistics, STATISTICS_PATHS)
    world_size = _check_rows(x, "global_statistics", group)
    if world_size == 1:
        return x
    sizes = [x.shape[-2]] * world_size if equal_local_batches else None
    counts = _row_counts(x, group, world_size, sizes, "gather_distributed=True")
    if statistics_path(statistics, sum(counts), x.shape[-1]) == "gather":
        return _AllGatherRows.apply(x, group, counts, _rank(group))
    return _reduce(x, group, sum(counts), precision)
