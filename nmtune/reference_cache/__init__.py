"""A per-example cache of the consistency reference ``F``: :class:`ReferenceCache`.

``F`` (the frozen model's pooled features) depends only on the input, so for a
fixed dataset without random augmentation it is the same every epoch. The cache
stores it per training example on the first epoch (or in an explicit pre-pass,
:meth:`ReferenceCache.precompute`) and serves it afterwards, so later epochs skip
the reference forward pass.

```
epoch 1: x ─► backbone (adapter off) ─► F ─► cache.store(keys, F)
epoch 2: keys ─► cache.lookup(keys) ─► F            (no reference forward)
```

Keys are integer example indices ``0 <= key < num_examples`` taken from the data
(an index column). Storage is a tensor in memory (``path=None``) or a
memory-mapped file on disk (``path=...``), ``num_examples x dim`` in the model's
dtype. The cache refuses, with a clear error, every case where ``F`` would not be a
function of the key: a model whose reference path is random (dropout, batch
statistics), a model or adapter state different from the one the cache was built
for (a cheap fingerprint), a changed user context (tokenizer, max length,
transform), a stored ``F`` that a recomputation contradicts (random augmentation),
and a batch with a duplicated or out-of-range key.

On disk, rows are written to the data file first and only then marked filled in a
bitmap that is replaced atomically (write to a temporary file, ``fsync``,
``os.replace``), so an interrupted run never leaves a half-written row readable as
valid: a row not yet committed is simply recomputed after a restart.

Distributed: each rank holds its own cache of the keys it sees (in memory, or
its own ``path``: two processes cannot open one path). When the sampler
reshuffles across ranks each epoch, a key first seen on another rank is a miss
on this one: it falls back to the forward pass, is counted in ``misses`` and
stored, so each rank's cache fills up over the epochs. A pre-pass over the whole
dataset on every rank (:meth:`ReferenceCache.precompute`) removes those misses.

Layout, bottom up: ``_storage`` (where rows live: a tensor, or memory-mapped files
in a locked folder with ``meta.json``), ``_fingerprint`` (:func:`model_fingerprint`
and the model checks), ``_table`` (the rows: filled bitmap, write-once, commit),
``_protocol`` (the per-batch protocol over them: ``check_model``, ``lookup``,
``get``, ``store``), ``_prepass`` and :mod:`.cache` (:class:`ReferenceCache`: the
checked constructor and ``precompute``).
"""

from nmtune.reference_cache._fingerprint import model_fingerprint
from nmtune.reference_cache.cache import ReferenceCache

__all__ = ["ReferenceCache", "model_fingerprint"]
