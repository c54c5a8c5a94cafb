"""``BaseTester``: the checks every public operation of nmtune gets, on every device and dtype.

After kornia's ``BaseTester``: one ``Test<Op>(BaseTester)`` class per operation,
whose methods take the ``device`` and ``dtype`` fixtures that ``conftest.py``
parametrises (``--device``, ``--dtype``). A subclass must implement every
abstract check, so no operation silently lacks one:

* ``test_smoke``: it runs and returns the documented type, shape and dtype;
* ``test_exception``: bad input raises a clear error naming what was wrong;
* ``test_cardinality``: stacks ``(..., M, D)`` and both Gram sides (``M < D``, ``M > D``);
* ``test_reference``: value and gradient against the float64 reference (``reference.py``);
* ``test_gradcheck``: ``torch.autograd.gradcheck`` in float64;
* ``test_dynamo``: ``torch.compile(fullgraph=True)`` matches eager (no graph break, so no host read).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import Tensor

# Tolerances of a float32/float64 result against the float64 reference, by the input dtype. The spectrum
# and the Gram product run in float64 by default, so float32 inputs lose only their own rounding.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (2e-2, 2e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
COMPILE_BACKEND = "aot_eager"  # Dynamo + AOTAutograd as inductor sees them, without a C++ compile


def features(*shape: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             seed: int = 0) -> Tensor:
    """Seeded standard-normal features, drawn in float64 on the CPU (the same values on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def value_and_grad(fn: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Tensor]:
    """``fn(z)`` detached, and the gradient of its sum with respect to ``z``."""
    leaf = z.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    return out.detach(), grad


class BaseTester(ABC):
    @abstractmethod
    def test_smoke(self, device: torch.device, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def test_exception(self, device: torch.device, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def test_cardinality(self, device: torch.device, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def test_reference(self, device: torch.device, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def test_gradcheck(self, device: torch.device) -> None: ...

    @abstractmethod
    def test_dynamo(self, device: torch.device, dtype: torch.dtype) -> None: ...

    @staticmethod
    def assert_close(actual: Tensor, expected: Tensor, *, dtype: torch.dtype | None = None,
                     rtol: float | None = None, atol: float | None = None) -> None:
        """``actual`` against ``expected`` (moved to ``actual``'s device, compared in float64) with the
        tolerances of the input ``dtype`` (default: ``actual``'s)."""
        default_rtol, default_atol = TOLERANCES[dtype or actual.dtype]
        torch.testing.assert_close(
            actual.detach().double().cpu(), expected.detach().double().cpu(),
            rtol=default_rtol if rtol is None else rtol, atol=default_atol if atol is None else atol,
        )

    @staticmethod
    def gradcheck(fn: Callable[..., Tensor], *inputs: Tensor, **kwargs: Any) -> bool:
        """``torch.autograd.gradcheck`` on float64 leaves."""
        leaves = tuple(t.detach().double().requires_grad_(True) for t in inputs)
        return torch.autograd.gradcheck(fn, leaves, **{"eps": 1e-6, "atol": 1e-5, "rtol": 1e-4, **kwargs})

    @staticmethod
    def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
