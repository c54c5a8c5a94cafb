"""The reference features ``F`` of an :class:`~nmtune.lora.model.NMTuneLoraModel`, and its cache protocol.

``F`` is the model's pooled feature with the adapter disabled, computed under ``no_grad`` and, with
``reference_eval``, with every submodule in eval mode. A reference cache is any object with

* ``check_model(model)``: called once by ``set_reference_cache``; it refuses a model whose
  reference path it cannot serve;
* ``lookup(keys) -> Tensor | None``: every row's ``F`` in the model's dtype on ``keys.device``,
  or ``None`` unless all keys are cached;
* ``store(keys, features)``: keeps the ``F`` just computed.

With a cache set, ``forward`` needs ``reference_keys``: a hit skips the adapter-disabled pass,
a miss runs it and stores the result. The functions take the model itself (its ``peft_model``,
``adapter``, ``pooling``, ``reference_eval`` and ``reference_cache``); ``model`` calls them, and
so does :meth:`nmtune.ReferenceCache.precompute`, whose batches carry their keys (:func:`split_keys`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from nmtune.lora._utils import eval_mode

__all__ = ["CACHE_METHODS", "check_cache", "check_keys", "check_reference_shape", "reference_features",
           "reference_pass", "split_keys"]

CACHE_METHODS = ("check_model", "lookup", "store")
"""The methods a reference cache provides."""


def check_cache(cache: Any, model: nn.Module) -> None:
    """Refuse ``cache`` unless it has :data:`CACHE_METHODS` and ``cache.check_model(model)`` accepts ``model``."""
    missing = [m for m in CACHE_METHODS if not callable(getattr(cache, m, None))]
    if missing:
        raise TypeError(f"a reference cache needs methods {CACHE_METHODS}; {type(cache).__name__} lacks {missing}")
    cache.check_model(model)


def check_keys(keys: Any) -> Tensor:
    """``keys`` if it is a 1-D integer tensor (one key per row), else ``TypeError``.

    Example:
        >>> check_keys(torch.arange(3))
        tensor([0, 1, 2])
    """
    if not isinstance(keys, Tensor) or keys.dim() != 1 or keys.is_floating_point() or keys.dtype == torch.bool:
        got = f"{keys.dtype} tensor of shape {tuple(keys.shape)}" if isinstance(keys, Tensor) else type(keys).__name__
        raise TypeError(f"reference_keys must be a 1-D integer tensor (one key per row); got {got}")
    return keys


def split_keys(batch: Any, key: str | int, *, name: str = "key") -> tuple[Any, Any]:
    """A batch's keys and the rest: a dict's ``key`` column and its other columns, or a tuple's
    ``batch[key]`` and ``batch[0]`` (the inputs).

    Raises:
        ValueError: A dict without the ``key`` column (named as the argument ``name``).
        TypeError: Neither a dict nor a tuple with an integer ``key``.

    Example:
        >>> split_keys({"idx": torch.arange(2), "x": torch.zeros(2, 3)}, "idx")[1].keys()
        dict_keys(['x'])
    """
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(f"{name}={key!r} but the batch has no such column; got columns {sorted(batch)}")
        return batch[key], {k: v for k, v in batch.items() if k != key}
    if isinstance(batch, (tuple, list)) and isinstance(key, int):
        return batch[key], batch[0]
    raise TypeError(f"batches must be dicts (key = column name) or tuples (key = position); got {type(batch).__name__}")


def reference_pass(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
    """``F`` computed: ``model``'s pooled features with the adapter disabled, under ``no_grad``."""
    ctx = eval_mode(model.peft_model) if model.reference_eval else contextlib.nullcontext()
    with model.peft_model.disable_adapter(), torch.no_grad(), ctx:
        _, reference = model.adapter.features(model.peft_model, args, kwargs, model.pooling, False)
    return reference.detach()


def reference_features(model: nn.Module, args: tuple, kwargs: dict[str, Any], keys: Any, use_cache: bool) -> Tensor:
    """``F`` for one batch: read from ``model.reference_cache`` on a hit, else computed (and stored)."""
    cache = model.reference_cache if use_cache else None
    if cache is None:
        if keys is not None and use_cache:
            raise ValueError(
                "reference_keys were given but no reference cache is set; call "
                "model.set_reference_cache(cache) first, or drop reference_keys"
            )
        return reference_pass(model, args, kwargs)
    if keys is None:
        raise ValueError(
            "a reference cache is set, so forward needs reference_keys=<1-D integer tensor, one key per row> "
            "(or use_reference_cache=False for a batch from another dataset)"
        )
    keys = check_keys(keys)
    cached = cache.lookup(keys)
    if cached is not None:
        return cached
    reference = reference_pass(model, args, kwargs)
    if reference.shape[0] != keys.shape[0]:
        raise ValueError(f"reference_keys has {keys.shape[0]} key(s) for a batch of {reference.shape[0]} row(s)")
    cache.store(keys, reference)
    return reference


def check_reference_shape(reference: Tensor | None, z: Tensor) -> None:
    """Refuse a reference ``F`` whose shape is not that of ``Z`` (e.g. one cached for another model)."""
    if reference is not None and reference.shape != z.shape:
        raise ValueError(
            f"the reference features have shape {tuple(reference.shape)} but Z has {tuple(z.shape)} "
            "(a reference cache built for another model or batch?)"
        )
