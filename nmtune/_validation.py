"""Argument checks shared by every public entry point.

One function per kind of check, so that every entry point rejects the same bad
value with the same message (``True`` is not an integer here, though Python's
``bool`` subclasses ``int``).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["check_int", "check_real", "check_bool", "check_choice", "check_tensor", "check_features", "check_module",
           "check_device", "check_same_device"]


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]``; bools are refused.

    Accepts Python and NumPy integers.

    Raises:
        TypeError: ``value`` is not an integer (or is a bool).
        ValueError: ``value`` is out of range.

    Example:
        >>> check_int("r", 8, minimum=1)
        8
        >>> check_int("r", True, minimum=1)
        Traceback (most recent call last):
        ...
        TypeError: r must be an int; got True (bool)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum}; got {value}")
    return value


def check_real(
    name: str, value: object, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    """``value`` as a finite ``float`` within ``[minimum, maximum]``; bools are refused.

    Example:
        >>> check_real("lambda_", 0.01, minimum=0.0)
        0.01
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool``, else ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value: object, choices: tuple, *, what: str | None = None) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them (``TypeError`` for a value
    of another type than the choices', such as an array, which ``in`` cannot compare).

    ``what`` names the kind of choice, for a message that says so ("unknown preset ...").

    Example:
        >>> check_choice("name", "paperz", ("none", "paper"), what="preset")
        Traceback (most recent call last):
        ...
        ValueError: unknown preset 'paperz' (name); expected one of ['none', 'paper']
    """
    kinds = tuple({type(c) for c in choices})
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{name} must be one of {choices}; got {type(value).__name__} {value!r:.80}")
    if value not in choices:
        if what is not None:
            raise ValueError(f"unknown {what} {value!r} ({name}); expected one of {list(choices)}")
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value


def check_tensor(
    name: str,
    value: object,
    *,
    kind: str = "floating",
    min_dim: int = 0,
    nonempty: bool = False,
    needs_values: bool = False,
) -> torch.Tensor:
    """``value`` if it is a tensor of ``kind`` with at least ``min_dim`` dims, else an error naming ``name``.

    Args:
        name: The argument's name, for the messages.
        value: What the caller passed.
        kind: ``"floating"`` (float16/bfloat16/float32/float64), ``"integer"`` (integer
            dtypes, not bool) or ``"any"``.
        min_dim: Fewest dimensions accepted.
        nonempty: Refuse a tensor whose last dimension is empty.
        needs_values: Refuse a meta tensor (shapes only): the entry point reads values.

    Raises:
        TypeError: not a tensor, or the wrong dtype kind.
        ValueError: too few dims, empty, or a meta tensor where values are needed.

    Example:
        >>> import torch
        >>> check_tensor("sigma", torch.ones(3), min_dim=1).shape
        torch.Size([3])
    """
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    if kind == "floating" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64); got dtype "
                        f"{value.dtype}")
    if kind == "integer" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor; got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s); got shape {tuple(value.shape)}")
    if nonempty and (value.dim() == 0 or value.shape[-1] == 0):
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); expected at least one value")
    if needs_values and value.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without values); this function reads its values")
    return value


def check_features(
    name: str, value: object, *, min_rows: int = 1, matrix: bool = False, needs_values: bool = False,
    like: tuple[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``value`` if it is a batch of feature rows, else an error naming ``name``.

    A floating tensor ``(..., M, D)`` (``matrix``: exactly ``(N, D)``) with ``D >= 1`` and at
    least ``min_rows`` rows; ``needs_values`` refuses a meta tensor;
    ``like=(other_name, other)``: of ``other``'s shape, on its device (a pair of feature batches).

    Raises:
        TypeError: not a floating-point tensor.
        ValueError: the wrong number of dims or rows, no feature columns, a meta tensor
            where values are needed, or another shape or device than ``like``'s.

    Example:
        >>> import torch
        >>> check_features("z", torch.ones(3, 1, 2), min_rows=2)
        Traceback (most recent call last):
        ...
        ValueError: z has 1 row(s); at least 2 needed (got shape (3, 1, 2))
    """
    value = check_tensor(name, value, needs_values=needs_values)
    shape = tuple(value.shape)
    if matrix and value.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D); got shape {shape}")
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape (..., M, D) with at least 2 dims; got shape {shape}")
    if value.shape[-2] < min_rows:
        raise ValueError(f"{name} has {value.shape[-2]} row(s); at least {min_rows} needed (got shape {shape})")
    if value.shape[-1] < 1:
        raise ValueError(f"{name} has no feature columns (got shape {shape})")
    if like is not None:
        other_name, other = like
        if other.shape != value.shape:
            raise ValueError(f"{other_name} and {name} must have the same shape (..., M, D); got {other_name} "
                             f"{tuple(other.shape)} and {name} {shape}")
        check_same_device(**{other_name: other, name: value})
    return value


def check_module(name: str, value: object) -> torch.nn.Module:
    """``value`` if it is an ``nn.Module``, else a ``TypeError`` naming ``name``."""
    from torch import nn

    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module; got {type(value).__name__}")
    return value


def check_device(name: str, value: object) -> torch.device:
    """``value`` (a ``torch.device``, a device string or a CUDA index) as a ``torch.device``."""
    import torch

    if isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a device string or an index; got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name} must name a device such as 'cpu' or 'cuda:0'; got {value!r}") from err


def check_same_device(**tensors: object) -> None:
    """One device for every tensor given, or a ``ValueError`` naming where each one is."""
    import torch

    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"every tensor must be on one device; got {where}")
