"""Testing helpers for code that uses nmtune.

``HostSyncCounter`` checks, on CPU, that a training step reads no tensor value on
the host (the CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``): the
project's tests and benchmarks use it, and so can yours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["HostSyncCounter"]


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
