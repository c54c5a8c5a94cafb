"""nmtune: NMTune regularizers for tuning features of noisily pre-trained models.

Public API (re-exports only; see the submodules for details):

* :class:`NMTuneLoss`, :class:`NMTuneRegularizer`, :class:`LossComponents` -- the loss
  (``nmtune.loss``); :class:`NMTuneConfig` -- its settings (``nmtune.config``);
* :class:`NMTuneHead`, :class:`HeadOutput` -- the black-box head (``nmtune.head``);
* :func:`fit`, :func:`evaluate`, :func:`extract_features`,
  :class:`TuningConfig`, :class:`FitResult` -- black-box tuning (``nmtune.tuning``);
* :func:`wrap_lora`, :func:`load_lora`, :class:`NMTuneLoraModel` -- NMTune on PEFT
  LoRA models (``nmtune.lora``; needs ``nmtune[lora]``); the transformers
  ``Trainer`` integration lives in ``nmtune.integrations``;
* :func:`symmetric_noise`, :func:`asymmetric_noise`, :func:`pair_flip_noise`,
  :func:`swap_pairs` -- seeded label-noise injection (``nmtune.noise``);
* :class:`ReferenceCache` -- the consistency reference F cached per example
  (``nmtune.reference_cache``);
* :mod:`nmtune.analysis` -- spectra and SVE/LSVR summaries of your features;
* :mod:`nmtune.functional` -- every term and metric as a pure function.
"""

from nmtune import analysis, functional, noise
from nmtune.head import HeadOutput, NMTuneHead
from nmtune.lora import NMTuneLoraModel, NMTuneLoraOutput, load_lora, wrap_lora
from nmtune.noise import NoisyLabels, asymmetric_noise, pair_flip_noise, swap_pairs, symmetric_noise
from nmtune.config import PRESETS, NMTuneConfig
from nmtune.loss import LossComponents, NMTuneLoss, NMTuneRegularizer
from nmtune.reference_cache import ReferenceCache
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
    "symmetric_noise",
    "asymmetric_noise",
    "pair_flip_noise",
    "swap_pairs",
    "NoisyLabels",
    "ReferenceCache",
    "functional",
    "noise",
    "analysis",
    "__version__",
]
