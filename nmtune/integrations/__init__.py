"""Integrations with training frameworks, each behind its optional extra.

* :class:`NMTuneTrainer` -- transformers' ``Trainer`` with the NMTune loss
  (``nmtune.integrations.transformers``; ``pip install "nmtune[lora]"``);
* :class:`NMTuneSentenceLoss`, :class:`NMTuneDataCollator` -- NMTune around any
  sentence-transformers loss (``nmtune.integrations.sentence_transformers``;
  ``pip install "nmtune[sentence-transformers]"``);
* :class:`SpectrumCallback` (a ``TrainerCallback``) and :class:`SpectrumMonitor` (plain
  PyTorch) -- SVE, LSVR and effective rank of the features on a probe set while
  training (``nmtune.integrations.spectrum``; the callback needs ``nmtune[lora]``).

Attributes are imported lazily, so ``import nmtune.integrations`` never imports
transformers or sentence-transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NMTuneTrainer", "NMTuneSentenceLoss", "NMTuneDataCollator", "SpectrumCallback", "SpectrumMonitor"]

_HOMES = {
    "NMTuneTrainer": "nmtune.integrations.transformers",
    "NMTuneSentenceLoss": "nmtune.integrations.sentence_transformers",
    "NMTuneDataCollator": "nmtune.integrations.sentence_transformers",
    "SpectrumCallback": "nmtune.integrations.spectrum",
    "SpectrumMonitor": "nmtune.integrations.spectrum",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
