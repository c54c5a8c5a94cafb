"""Global-batch statistics under data parallelism.

``L_COV`` and ``L_SVD`` are *batch* statistics: under
``DistributedDataParallel`` each rank only sees ``M / world_size`` rows, so
the covariance and the spectrum of a local batch differ from those of the
global batch (the spectrum has at most ``M_local`` non-zero singular values).
:func:`all_gather_rows` concatenates the rows of every rank's features so that
each rank computes the statistics of the global batch, and it does so inside
autograd:

* forward: ``all_gather`` along the row dimension (``-2``);
* backward: ``all_reduce(SUM)`` of the gradient of the gathered tensor, then
  this rank's slice of it.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_gather_rows", "is_distributed"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a process group is initialised.

    Example:
        >>> is_distributed()  # a plain Python process
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _require_process_group() -> None:
    if not is_distributed():
        raise RuntimeError(
            "all_gather_rows (NMTuneConfig.gather_distributed=True) needs an initialised torch.distributed "
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

        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(-2, start, ctx.sizes[ctx.rank]), None, None, None


def all_gather_rows(x: Tensor, *, group: Any = None, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate the rows (dim ``-2``) of ``x`` from every rank, differentiably.

    Rank ``r``'s rows come ``r``-th, so every rank holds the same global batch
    ``(..., sum_r M_r, D)``. The backward sums the gradient of the gathered
    tensor over ranks and returns this rank's slice; combined with DDP's
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
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` has fewer than 2 dims, or the ranks' shapes or
            ``sizes`` disagree.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)
        >>> z = torch.randn(8, 4, requires_grad=True)
        >>> all_gather_rows(z).shape
        torch.Size([8, 4])
        >>> dist.destroy_process_group()
    """
    import torch.distributed as dist

    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (..., M, D); got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., M, D) with at least 2 dims; got shape {tuple(x.shape)}")
    _require_process_group()
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return x
    rank = dist.get_rank(group)
    if sizes is None:
        shapes = _exchange_shapes(x, group, world_size)
        other = [s[:-2] + s[-1:] for s in shapes]
        if any(o != other[0] for o in other):
            raise ValueError(
                "all_gather_rows needs the same leading dims and feature width D on every rank; got shapes "
                f"{shapes} (rank order)"
            )
        row_counts = tuple(s[-2] for s in shapes)
    else:
        row_counts = tuple(int(n) for n in sizes)
        if len(row_counts) != world_size or row_counts[rank] != x.shape[-2]:
            raise ValueError(
                f"sizes must list every rank's row count ({world_size} entries, entry {rank} equal to this "
                f"rank's {x.shape[-2]} rows); got {list(sizes)!r}"
            )
    return _AllGatherRows.apply(x, group, row_counts, rank)
