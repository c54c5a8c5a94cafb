"""Contrastive (CLIP) pre-training with noisy image-text pairs, on open_clip; ``write-config`` for open_clip_train.

The code is ``nmtune_study.pretrain_clip`` (installed with ``pip install "nmtune[examples]"``);
``python examples/pretrain_clip.py --help`` and ``python -m nmtune_study.pretrain_clip --help`` are the same command.
"""

from nmtune_study.pretrain_clip import main

if __name__ == "__main__":
    raise SystemExit(main())
