"""Griffe extension of the documentation site: read nmtune's docstrings as written.

nmtune's Google-style docstrings head their doctests ``Example:`` (Napoleon's spelling);
griffe's Google parser only knows ``Examples:``, and would render the doctest output as
Markdown (``[1.0, 1.0]`` read as a reference link). Sphinx roles (``:func:`fit```) are
shown as code. The source keeps its spelling; only the site's copy is rewritten.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc|const|py:\w+):`(~?)([^`]+)`")


def _role(m: re.Match) -> str:
    name = m.group(2)
    return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"


class NMTuneDocstrings(griffe.Extension):
    """Rename ``Example:`` sections to ``Examples:`` and show Sphinx roles as code."""

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        _fix(obj)

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:  # the top-level package is no member
        _fix(pkg)


def _fix(obj: Any) -> None:
    if obj.docstring is not None:
        text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        obj.docstring.value = _ROLE.sub(_role, text)
