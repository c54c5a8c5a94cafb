"""The language study (Table 2 analogue): black-box NMTune on frozen text encoders and embedding APIs.

The code is ``nmtune_study.language`` (installed with ``pip install "nmtune[examples]"``);
``python examples/language.py --help`` and ``python -m nmtune_study.language --help`` are the same command.
"""

from nmtune_study.language import main

if __name__ == "__main__":
    raise SystemExit(main())
