"""Argument checks shared by every public entry point.

One function per kind of check, so that every entry point rejects the same bad
value with the same message (``True`` is not an integer here, though Python's
``bool`` subclasses ``int``).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["check_int", "check_real", "check_bool", "check_choice"]


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


def check_choice(name: str, value: object, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value
