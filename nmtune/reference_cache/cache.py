"""The public class of the package: :class:`ReferenceCache`.

Its layers, bottom up: :class:`~._table._FeatureTable` holds the rows (memory or
memory-mapped files, the filled bitmap, crash-safe commits);
:class:`~._protocol._ReferenceProtocol` binds them to a model and serves them per
batch (``check_model``, ``lookup``, ``get``, ``store``); :class:`ReferenceCache` adds
the checked constructor and the pre-pass over a dataset (``precompute``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmtune._validation import check_device, check_int, check_real
from nmtune.reference_cache._prepass import _lora_reference, _split_batch
from nmtune.reference_cache._protocol import _ReferenceProtocol
from nmtune.reference_cache._storage import _parse_dtype

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


class ReferenceCache(_ReferenceProtocol):
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
        verify_batches = check_int("verify_batches", verify_batches, minimum=0)
        verify_tol = check_real("verify_tol", verify_tol, minimum=0.0)
        commit_every = check_int("commit_every", commit_every, minimum=1)
        device = check_device("device", device)
        super().__init__(
            num_examples, dim, dtype, verify_batches=verify_batches, verify_tol=verify_tol, commit_every=commit_every,
            context=_json_context(context), path=None if path is None else Path(path), device=device,
        )

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
                keys, inputs = _split_batch(batch, key)
                idx = self._indices(keys)
                if not self._all_filled(idx):
                    self.store(keys, compute(model, inputs))
                    computed += int(idx.size)
        self.commit()
        return computed
