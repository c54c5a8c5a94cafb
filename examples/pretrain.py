"""Supervised pre-training of a timm architecture with label noise ratio gamma (resumable; DDP under torchrun).

The code is ``nmtune_study.pretrain`` (installed with ``pip install "nmtune[examples]"``);
``python examples/pretrain.py --help`` and ``python -m nmtune_study.pretrain --help`` are the same command.
"""

from nmtune_study.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
