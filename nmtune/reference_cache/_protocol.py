"""The per-batch protocol of a reference cache, over its rows: :class:`_ReferenceProtocol`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmtune.reference_cache._fingerprint import _check_model
from nmtune.reference_cache._table import _FeatureTable, _key_indices


class _ReferenceProtocol(_FeatureTable):
    """What a model calls per batch (:meth:`check_model`, :meth:`lookup`, :meth:`store`), and :meth:`get`.

    A :class:`_FeatureTable` bound to the reference model its rows come from: no row
    is read or written before :meth:`check_model` has recorded (or compared) the
    model's fingerprint. ``hits`` and ``misses`` count the examples served from the
    rows and those whose ``F`` the model had to compute.
    """

    def __init__(self, *args: Any, verify_batches: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verify_batches = verify_batches
        self.hits = self.misses = 0

    def _indices(self, keys: Any) -> np.ndarray:
        if self._fingerprint is None:
            raise RuntimeError(
                "call cache.check_model(reference_model) before using the cache (NMTuneLoraModel.set_reference_cache "
                "and precompute do it): the cache records which model its features belong to"
            )
        return _key_indices(keys, self.num_examples)

    def _all_filled(self, idx: np.ndarray) -> bool:
        return self.dim is not None and bool(self._filled[idx].all())

    def _read(self, idx: np.ndarray, keys: Any) -> Tensor:
        device = keys.device if isinstance(keys, Tensor) else torch.device("cpu")
        return self._storage.read(idx).to(device, non_blocking=True)

    def check_model(self, model: nn.Module) -> None:
        """Record (fresh cache) or check (filled or reopened cache) the model ``F`` comes from.

        Raises:
            ValueError: The reference path is random (dropout / training mode,
                ``reference_eval=False``, merged adapters, a reference model whose
                parameters all train), or the model differs from the one the cache
                was built for (the message names the changed parts).
        """
        fingerprint = _check_model(model, self._fingerprint, self.path)
        if self._fingerprint is None:
            self._fingerprint = fingerprint
            self._write_meta()

    def lookup(self, keys: Tensor) -> Tensor | None:
        """``F`` of every key ``(B, D)`` on ``keys.device``, or ``None`` if one is not cached.

        Verification: the first ``verify_batches`` lookups whose keys are all cached
        answer ``None`` anyway, so that the model recomputes ``F`` and :meth:`store`
        compares it with the cached rows (a stored row is never overwritten); a relative
        difference above ``verify_tol`` raises: ``F`` is not a function of the key
        (random augmentation in the data pipeline, or a changed model).

        Raises:
            ValueError: A duplicated or out-of-range key, or keys not a 1-D integer tensor.
        """
        idx = self._indices(keys)
        if not self._all_filled(idx):
            self.misses += idx.size
            return None
        if self.verify_batches > 0:  # let the model recompute these; store() compares
            self.verify_batches -= 1
            self.misses += idx.size
            return None
        self.hits += idx.size
        return self._read(idx, keys)

    def get(self, keys: Tensor) -> Tensor:
        """Like :meth:`lookup` but every key must be cached (no verification): for a
        cache filled by :meth:`precompute` whose reference model is gone.

        Raises:
            KeyError: Some keys were never stored (the message lists them).
        """
        idx = self._indices(keys)
        missing = idx[~self._filled[idx]] if self.dim is not None else idx
        if missing.size:
            raise KeyError(
                f"{missing.size} key(s) not in the reference cache, e.g. {missing[:5].tolist()}; run "
                "cache.precompute(...) over the whole dataset first"
            )
        self.hits += idx.size
        return self._read(idx, keys)

    def store(self, keys: Tensor, features: Tensor) -> None:
        """Store ``F`` ``(B, D)`` of ``keys``; rows already cached are compared, not overwritten.

        Raises:
            ValueError: Bad keys, a shape that does not fit, or a recomputed row that
                differs from its cached one by more than ``verify_tol``.
            TypeError: ``features`` is not a floating tensor of the cache's dtype.
        """
        self._write(self._indices(keys), features)

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, dim={self.dim}, dtype={self.dtype}, "
            f"storage={where}, filled={self.num_filled}, hits={self.hits}, misses={self.misses})"
        )
