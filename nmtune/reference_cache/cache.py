"""The public class of the package: :class:`ReferenceCache`.

A :class:`ReferenceCache` holds its rows in a :class:`~._table._FeatureTable` (memory or
memory-mapped files, the filled bitmap, crash-safe commits) and binds them to the
model they come from: it serves them per batch (``check_model``, ``lookup``, ``get``,
``store``, counting hits and misses) and fills them in a pre-pass over a dataset
(``precompute``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmtune._validation import check_device, check_int, check_real
from nmtune.lora._utils import unwrap_model
from nmtune.lora.model import NMTuneLoraModel
from nmtune.lora.reference import reference_pass, split_keys
from nmtune.reference_cache._fingerprint import _check_model
from nmtune.reference_cache._storage import _parse_dtype
from nmtune.reference_cache._table import _FeatureTable, _key_indices

__all__ = ["ReferenceCache"]


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    parsed = _parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if parsed is not None and (not isinstance(parsed, torch.dtype) or not parsed.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype or None; got {dtype!r}")
    return parsed


def _json_context(context: Mapping[str, Any] | None) -> dict[str, Any]:
    if context is not None and not isinstance(context, Mapping):
        raise TypeError(f"context must be a mapping of names to JSON values or None; got {type(context).__name__}")
    try:
        return json.loads(json.dumps(dict(context or {}), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"context must map names to JSON values (str, int, float, bool, None); {err}") from err


class _OfTable:
    """A read-only attribute of a :class:`ReferenceCache` that its table of rows holds."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, cache: ReferenceCache | None, owner: type | None = None) -> Any:
        return self if cache is None else getattr(cache._rows, self.name)


class ReferenceCache:
    """Reference features ``F`` per training example, in memory or memory-mapped on disk.

    The model calls :meth:`check_model` once when the cache is attached, then per
    batch :meth:`lookup` (every key cached: ``F`` from the cache, else ``None`` and
    the model runs its reference forward) and, after a miss, :meth:`store`.
    ``hits`` and ``misses`` count examples served from the cache and examples whose
    ``F`` was computed by a forward pass.

    Args:
        num_examples: Number of examples ``N``; keys are ``0 <= key < N``.
        dim: Feature width ``D``; ``None`` takes it from the first :meth:`store`.
        dtype: Feature dtype; ``None`` takes it from the first :meth:`store`
            (the model's dtype). Stored as is, so cached ``F`` is bit-identical.
        path: A directory for a memory-mapped cache (created if needed; reopened,
            checked and resumed if it holds one); ``None`` keeps the rows in memory.
        device: Where an in-memory cache keeps its rows (``"cpu"`` or a GPU).
        context: What ``F`` depends on besides the model, declared by the user
            (JSON values: tokenizer name, ``max_length``, image transform name...);
            a reopened cache with a different context is refused.
        verify_batches: Fully cached batches to recompute and compare (0: none);
            the attribute counts down as they are used.
        verify_tol: Largest relative row difference ``||F_new - F|| / ||F||``
            accepted by the verification (0: bit-identical).
        commit_every: On disk, mark newly stored rows as valid every this many
            :meth:`store` calls (and on :meth:`commit` / :meth:`close`); rows not
            yet committed are recomputed after a crash.

    Attributes:
        hits: Examples served from the cache.
        misses: Examples whose ``F`` a forward pass computed.
        verify_batches: Verifications left (see the argument).
        num_examples: ``N``.
        dim: The feature width ``D`` (``None`` until the first :meth:`store`).
        dtype: The feature dtype (``None`` until the first :meth:`store`).
        path: The cache's folder, or ``None`` in memory.
        num_filled: Examples whose ``F`` is cached.
        verified: Rows stored again and compared with the cached ones.
        resident_bytes: Bytes of process memory the rows take (in memory:
            ``N x D x itemsize``; on disk: 0, page cache aside).
        disk_bytes: Bytes allocated on disk (sparse: rows never stored take none).

    Example:
        >>> ref = nn.Linear(4, 3).requires_grad_(False).eval()
        >>> cache = ReferenceCache(10, context={"transform": "none"})
        >>> cache.check_model(ref)
        >>> keys, x = torch.tensor([3, 7]), torch.randn(2, 4)
        >>> cache.lookup(keys) is None
        True
        >>> cache.store(keys, ref(x))
        >>> cache.verify_batches = 0
        >>> torch.equal(cache.lookup(keys), ref(x))
        True
        >>> cache.hits, cache.misses
        (2, 2)
    """

    def __init__(
        self, num_examples: int, dim: int | None = None, *, dtype: torch.dtype | str | None = None,
        path: str | os.PathLike | None = None, device: torch.device | str = "cpu",
        context: Mapping[str, Any] | None = None, verify_batches: int = 1, verify_tol: float = 1e-3,
        commit_every: int = 1,
    ) -> None:
        num_examples = check_int("num_examples", num_examples, minimum=1)
        dim = None if dim is None else check_int("dim", dim, minimum=1)
        dtype = _check_dtype(dtype)
        self.verify_batches = check_int("verify_batches", verify_batches, minimum=0)
        verify_tol = check_real("verify_tol", verify_tol, minimum=0.0)
        commit_every = check_int("commit_every", commit_every, minimum=1)
        device = check_device("device", device)
        self.hits = self.misses = 0
        self._rows = _FeatureTable(
            num_examples, dim, dtype, verify_tol=verify_tol, commit_every=commit_every, context=_json_context(context),
            path=None if path is None else Path(path), device=device,
        )

    # -- what the rows are: held by the table (see Attributes) -------------------------------------
    num_examples = _OfTable()
    dim = _OfTable()
    dtype = _OfTable()
    path = _OfTable()
    num_filled = _OfTable()
    verified = _OfTable()
    resident_bytes = _OfTable()
    disk_bytes = _OfTable()

    @property
    def fingerprint(self) -> dict[str, str] | None:
        """The fingerprint of the model the cache was built for (see :func:`model_fingerprint`)."""
        return None if self._rows.model is None else dict(self._rows.model)

    # -- the per-batch protocol ------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Record (fresh cache) or check (filled or reopened cache) the model ``F`` comes from.

        Raises:
            ValueError: The reference path is random (dropout / training mode,
                ``reference_eval=False``, merged adapters, a reference model whose
                parameters all train), or the model differs from the one the cache
                was built for (the message names the changed parts).
        """
        fingerprint = _check_model(model, self._rows.model, self.path)
        if self._rows.model is None:
            self._rows.record_model(fingerprint)

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
        if self._rows.missing(idx).size:
            self.misses += idx.size
            return None
        if self.verify_batches > 0:  # let the model recompute these; store() compares
            self.verify_batches -= 1
            self.misses += idx.size
            return None
        self.hits += idx.size
        return self._rows.read(idx, _device_of(keys))

    def get(self, keys: Tensor) -> Tensor:
        """Like :meth:`lookup` but every key must be cached (no verification): for a
        cache filled by :meth:`precompute` whose reference model is gone.

        Raises:
            KeyError: Some keys were never stored (the message lists them).
        """
        idx = self._indices(keys)
        missing = self._rows.missing(idx)
        if missing.size:
            raise KeyError(
                f"{missing.size} key(s) not in the reference cache, e.g. {missing[:5].tolist()}; run "
                "cache.precompute(...) over the whole dataset first"
            )
        self.hits += idx.size
        return self._rows.read(idx, _device_of(keys))

    def store(self, keys: Tensor, features: Tensor) -> None:
        """Store ``F`` ``(B, D)`` of ``keys``; rows already cached are compared, not overwritten.

        Raises:
            ValueError: Bad keys, a shape that does not fit, or a recomputed row that
                differs from its cached one by more than ``verify_tol``.
            TypeError: ``features`` is not a floating tensor of the cache's dtype.
        """
        self._rows.write(self._indices(keys), features)

    def _indices(self, keys: Any) -> np.ndarray:
        if self._rows.model is None:
            raise RuntimeError(
                "call cache.check_model(reference_model) before using the cache (NMTuneLoraModel.set_reference_cache "
                "and precompute do it): the cache records which model its features belong to"
            )
        return _key_indices(keys, self.num_examples)

    # -- filling it and closing it ---------------------------------------------------------------
    def precompute(
        self, model: nn.Module, batches: Iterable[Any], *, key: str | int = "idx",
        features_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> int:
        """Fill the cache by one pass over ``batches`` (no gradients); returns rows computed.

        Args:
            model: An :class:`nmtune.NMTuneLoraModel` (``F`` = its features with the
                adapter disabled, in eval mode), or a frozen reference model in eval
                mode together with ``features_fn``.
            batches: Dict batches (``key`` names the index column; the rest, label
                columns aside, is passed to the model as keyword arguments) or tuples
                (``key`` is the position of the keys; the model gets ``batch[0]``).
            key: The index column (dicts) or position (tuples).
            features_fn: ``(model, inputs) -> F`` for models other than
                ``NMTuneLoraModel``.

        Example:
            >>> ref = nn.Linear(4, 3).requires_grad_(False).eval()
            >>> data = [{"x": torch.randn(5, 4), "idx": torch.arange(5 * i, 5 * i + 5)} for i in range(2)]
            >>> cache = ReferenceCache(10)
            >>> cache.precompute(ref, data, features_fn=lambda m, b: m(b["x"]))
            10
            >>> cache.get(torch.arange(10)).shape
            torch.Size([10, 3])
        """
        self.check_model(model)
        compute = features_fn if features_fn is not None else _lora_reference
        computed = 0
        with torch.no_grad():
            for batch in batches:
                keys, inputs = split_keys(batch, key, name="key")
                idx = self._indices(keys)
                if self._rows.missing(idx).size:
                    self.store(keys, compute(model, inputs))
                    computed += int(idx.size)
        self.commit()
        return computed

    def commit(self) -> None:
        """Make every stored row durable and valid on disk (no-op in memory)."""
        self._rows.commit()

    def close(self) -> None:
        """Commit and release the file lock; the cache is unusable afterwards."""
        self._rows.close()

    def __enter__(self) -> ReferenceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, dim={self.dim}, dtype={self.dtype}, "
            f"storage={where}, filled={self.num_filled}, hits={self.hits}, misses={self.misses})"
        )


def _device_of(keys: Any) -> torch.device:
    return keys.device if isinstance(keys, Tensor) else torch.device("cpu")


# Label columns of a dict batch: the loss's, not the model's.
_LABEL_COLUMNS = ("labels", "label", "label_ids")


def _lora_reference(model: nn.Module, inputs: Any) -> Tensor:
    """``F`` of an ``NMTuneLoraModel`` (:func:`~nmtune.lora.reference.reference_pass`): its features
    with the adapter disabled, in eval mode."""
    inner = unwrap_model(model)
    if not isinstance(inner, NMTuneLoraModel):
        raise TypeError(
            f"precompute computes F itself only for an NMTuneLoraModel; for {type(inner).__name__} pass "
            "features_fn=lambda model, inputs: ..."
        )
    if isinstance(inputs, Mapping):
        return reference_pass(inner, (), {k: v for k, v in inputs.items() if k not in _LABEL_COLUMNS})
    return reference_pass(inner, (inputs,), {})
