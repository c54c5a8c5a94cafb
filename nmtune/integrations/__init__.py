"""Integrations with training frameworks, each behind its optional extra.

* :class:`NMTuneTrainer` -- transformers' ``Trainer`` with the NMTune loss
  (``nmtune.integrations.transformers``; ``pip install "nmtune[lora]"``).

Attributes are imported lazily, so ``import nmtune.integrations`` never imports
transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NMTuneTrainer"]


def __getattr__(name: str) -> Any:
    if name == "NMTuneTrainer":
        from nmtune.integrations.transformers import NMTuneTrainer

        return NMTuneTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
