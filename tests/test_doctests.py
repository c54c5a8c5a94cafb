"""The ``Example:`` blocks of nmtune's docstrings run as doctests, so they cannot rot."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import nmtune

MODULES = sorted(m.name for m in pkgutil.walk_packages(nmtune.__path__, "nmtune."))


def test_every_module_is_collected() -> None:
    assert {"nmtune.functional", "nmtune.loss", "nmtune.tuning", "nmtune.lora", "nmtune.distributed"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed (see stdout)"
