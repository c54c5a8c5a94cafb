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
* :func:`symmetric_noise`, :func:`asymmetric_noise`, :func:`pair_flip_noise`,
  :func:`swap_pairs` -- seeded label-noise injection (``nmtune.noise``);
* :mod:`nmtune.analysis` -- spectra, SVE/LSVR summaries, claim checks, plots;
* :mod:`nmtune.functional` -- every term and metric as a pure function.
"""

from nmtune import analysis, functional, noise
from nmtune.head import HeadOutput, NMTuneHead
from nmtune.lora import NMTuneLoraModel, NMTuneLoraOutput, load_lora, wrap_lora
from nmtune.noise import NoisyLabels, asymmetric_noise, pair_flip_noise, swap_pairs, symmetric_noise
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
    "symmetric_noise",
    "asymmetric_noise",
    "pair_flip_noise",
    "swap_pairs",
    "NoisyLabels",
    "functional",
    "noise",
    "analysis",
    "__version__",
]
