"""The downstream protocol on frozen features: LP, MLP tuning and NMTune (+ LoRA rows).

The code is ``nmtune_study.evaluate`` (installed with ``pip install "nmtune[examples]"``);
``python examples/evaluate.py --help`` and ``python -m nmtune_study.evaluate --help`` are the same command.
"""

from nmtune_study.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
