"""The contrastive (CLIP) regime end to end: noisy pairs, pre-training, features, LP / MLP / NMTune, zero-shot.

The code is ``nmtune_study.contrastive`` (installed with ``pip install "nmtune[examples]"``);
``python examples/contrastive.py --help`` and ``python -m nmtune_study.contrastive --help`` are the same command.
"""

from nmtune_study.contrastive import main

if __name__ == "__main__":
    raise SystemExit(main())
