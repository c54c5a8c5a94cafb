"""The NMTune paper-reproduction study, as a package (``pip install "nmtune[examples]"``).

``examples/*.py`` are thin entry points into the commands here; each command module has
``main(argv=None) -> int`` and runs as ``python -m nmtune_study.NAME``:

* :mod:`~nmtune_study.reproduce`: the whole study, claims and report (``examples/reproduce_paper.py``);
* :mod:`~nmtune_study.pretrain`, :mod:`~nmtune_study.pretrain_clip`: supervised and contrastive
  pre-training on noisy labels / captions, on one loop toolkit (:mod:`~nmtune_study.train_loop`);
* :mod:`~nmtune_study.evaluate`: LP, MLP tuning and NMTune on frozen features;
* :mod:`~nmtune_study.contrastive`: the contrastive (CLIP) regime end to end;
* :mod:`~nmtune_study.language`: the language study (Table 2 analogue), with
  :mod:`~nmtune_study.encoders` for frozen text encoders;
* :mod:`~nmtune_study.noisy_shards`: noisy image-caption pairs and webdataset shards.

Underneath: :mod:`nmtune_study.data` (the offline vision, CLIP and text data),
:mod:`nmtune_study.report` (statistics and claim decisions apart from markdown and figures)
and :mod:`~nmtune_study.common` (atomic writes, command-line types, shared metrics).
"""
