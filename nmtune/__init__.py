"""nmtune: NMTune regularizers for tuning features of noisily pre-trained models.

Public API (re-exports only; see the submodules for details):

* :class:`NMTuneLoss`, :class:`NMTuneRegularizer`, :class:`NMTuneConfig`,
  :class:`LossComponents` -- the loss (``nmtune.loss``);
* :class:`NMTuneHead`, :class:`HeadOutput` -- the black-box head (``nmtune.head``);
* :func:`fit`, :func:`evaluate`, :func:`extract_features`,
  :class:`TuningConfig`, :class:`FitResult` -- black-box tuning (``nmtune.tuning``);
* :func:`wrap_lora`, :func:`load_lora`, :class:`NMTuneLoraModel` -- NMTune on PEFT
  LoRA models (``nmtune.lora``; needs ``nmtune[lora]``); the transformers
  ``Trainer`` integration lives in ``nmtune.integrations``;
* :mod:`nmtune.functional` -- every term and metric as a pure function.
"""

from nmtune import functional
from nmtune.head import HeadOutput, NMTuneHead
from nmtune.lora import NMTuneLoraModel, NMTuneLoraOutput, load_lora, wrap_lora
from nmtune.loss import PRESETS, LossComponents, NMTuneConfig, NMTuneLoss, NMTuneRegularizer
from nmtune.tuning import FitResult, TuningConfig, evaluate, extract_features, fit

__version__ = "0.1.0"

__all__ = [
    "NMTuneLoss",
    "NMTuneRegularizer",
    "NMTuneConfig",
    "LossComponents",
    "PRESETS",
    "NMTuneHead",
    "HeadOutput",
    "fit",
    "evaluate",
    "extract_features",
    "TuningConfig",
    "FitResult",
    "wrap_lora",
    "load_lora",
    "NMTuneLoraModel",
    "NMTuneLoraOutput",
    "functional",
    "__version__",
]
