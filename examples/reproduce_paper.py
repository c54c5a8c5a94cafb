"""The paper's study end to end (noisy pre-training, ID/OOD evaluation, claims with intervals).

The code is ``nmtune_study.reproduce`` (installed with ``pip install "nmtune[examples]"``);
``python examples/reproduce_paper.py --help`` and ``python -m nmtune_study.reproduce --help`` are the same command.
"""

from nmtune_study.reproduce import main

if __name__ == "__main__":
    raise SystemExit(main())
