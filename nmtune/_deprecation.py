"""The 0.1 names, still accepted until nmtune 0.3: one warning, reached three ways.

:func:`warn_renamed` is the only place that warns; its text ends with "the old name
works until nmtune 0.3", which ``pyproject.toml``'s ``filterwarnings`` turns into an
error for nmtune's own code, examples and tests. An old name is reached

* as a class attribute: :class:`RenamedAttribute` (``NMTuneConfig.mse_weight``,
  ``NMTuneConfig.uses_spectrum``);
* as a keyword: :func:`renamed_keywords` (``NMTuneConfig(mse_weight=...)``, ``replace``,
  ``from_preset``, ``from_dict``);
* as a module attribute: :func:`module_getattr` (``nmtune.functional.ratio_from_singular_values``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__: list[str] = []  # private module

REMOVED_IN = "0.3"


def warn_renamed(owner: str, old: str, new: str, *, stacklevel: int = 2) -> None:
    """Warn that ``owner.old`` is now ``new`` (``stacklevel`` counts from the caller of this function)."""
    warnings.warn(f"{owner}.{old} is renamed {new!r}; the old name works until nmtune {REMOVED_IN}",
                  DeprecationWarning, stacklevel=stacklevel + 1)


class RenamedAttribute:
    """A class attribute under its 0.1 name: reading it on an instance warns and reads ``new``."""

    def __init__(self, new: str) -> None:
        self.new = new

    def __set_name__(self, owner: type, name: str) -> None:
        self.owner, self.old = owner.__name__, name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        warn_renamed(self.owner, self.old, self.new)
        return getattr(obj, self.new)


def renamed_keywords(
    owner: str, kwargs: Mapping[str, Any], renames: Mapping[str, str], *, stacklevel: int = 2
) -> dict[str, Any]:
    """``kwargs`` with each 0.1 name of ``renames`` (old -> new) replaced by its new one, warning once each
    (``stacklevel`` counts from the caller of this function, as :func:`warnings.warn`'s does).

    Raises:
        TypeError: An old name and its new one are both given.
    """
    out = dict(kwargs)
    for old, new in renames.items():
        if old in out:
            warn_renamed(owner, old, new, stacklevel=stacklevel + 1)
            if new in out:
                raise TypeError(f"{owner} got both {old!r} (deprecated) and {new!r}; pass only {new!r}")
            out[new] = out.pop(old)
    return out


def module_getattr(module: str, namespace: Mapping[str, Any], renames: Mapping[str, str]) -> Callable[[str], Any]:
    """A module's ``__getattr__`` (PEP 562) that serves each 0.1 name of ``renames`` as its new one, warning."""

    def __getattr__(name: str) -> Any:
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_renamed(module, name, renames[name])
        return namespace[renames[name]]

    return __getattr__
