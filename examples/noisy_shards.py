"""Noisy image-caption pairs: swap a fraction of captions in memory or in webdataset shards, with manifests.

The code is ``nmtune_study.noisy_shards`` (installed with ``pip install "nmtune[examples]"``);
``python examples/noisy_shards.py --help`` and ``python -m nmtune_study.noisy_shards --help`` are the same command.
"""

from nmtune_study.noisy_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
