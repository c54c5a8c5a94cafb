"""Testing helpers for code that uses nmtune.

``HostSyncCounter`` checks, on CPU, that a training step reads no tensor value on
the host (the CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``);
``CollectiveBytes`` counts what the ``torch.distributed`` collectives called from
Python handle. The project's tests and benchmarks use them, and so can yours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HostSyncCounter", "CollectiveBytes"]


class HostSyncCounter:
    """Counts the Python-level ways a step can wait on a tensor's value.

    Patches ``Tensor.item/tolist/__bool__/__float__/__int__/__index__/numpy``
    while active. The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``:
    a training step that reads no tensor value on the host counts zero.

    Example:
        >>> with HostSyncCounter() as syncs:
        ...     _ = torch.ones(2).sum() * 2
        >>> syncs.count
        0
    """

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self) -> None:
        self.count = 0
        self.calls: list[str] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostSyncCounter:
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t: Tensor, *a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                self.count += 1
                self.calls.append(_name)
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


class CollectiveBytes:
    """Counts the bytes the Python-level ``torch.distributed`` collectives handle on this rank.

    Patches ``all_gather``, ``all_reduce`` and ``reduce_scatter`` (the collectives
    nmtune calls) while active and records ``(name, bytes)`` per call, where bytes is
    the larger side of the collective on this rank: the gathered output of
    ``all_gather``, the buffer of ``all_reduce``, the list of inputs of
    ``reduce_scatter``. DDP's own gradient buckets (reduced from C++) are not seen.
    What a ring algorithm sends per rank follows from these: ``(W-1)/W`` of an
    all-gather's or reduce-scatter's bytes, ``2 (W-1)/W`` of an all-reduce's.

    Example:
        >>> with CollectiveBytes() as moved:
        ...     pass  # a step of a model under DDP
        >>> moved.total, moved.calls
        (0, [])
    """

    COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter")

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._saved: dict[str, Any] = {}

    @property
    def total(self) -> int:
        """Bytes over every recorded call."""
        return sum(n for _, n in self.calls)

    def by_name(self) -> dict[str, int]:
        """Bytes per collective name."""
        out: dict[str, int] = {}
        for name, n in self.calls:
            out[name] = out.get(name, 0) + n
        return out

    @staticmethod
    def _bytes(name: str, args: tuple[Any, ...]) -> int:
        tensors = args[1] if name == "reduce_scatter" else args[0]
        if isinstance(tensors, Tensor):
            tensors = [tensors]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __enter__(self) -> CollectiveBytes:
        import torch.distributed as dist

        for name in self.COLLECTIVES:
            original = getattr(dist, name)
            self._saved[name] = original

            def wrapper(*a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                self.calls.append((_name, self._bytes(_name, a)))
                return _orig(*a, **k)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as dist

        for name, original in self._saved.items():
            setattr(dist, name, original)
