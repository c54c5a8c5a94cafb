"""The pieces of :meth:`ReferenceCache.precompute <nmtune.reference_cache.ReferenceCache.precompute>`.

A batch's keys and inputs (:func:`_split_batch`) and ``F`` of an ``NMTuneLoraModel``
(:func:`_lora_reference`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from nmtune.reference_cache._fingerprint import _is_lora_model, _unwrap

_LABEL_COLUMNS = ("labels", "label", "label_ids")


def _split_batch(batch: Any, key: str | int) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"batch has no key column {key!r}; got columns {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != key}
        return batch[key], inputs
    if isinstance(batch, (tuple, list)) and isinstance(key, int):
        return batch[key], batch[0]
    raise TypeError(f"batches must be dicts (key = column name) or tuples (key = position); got {type(batch).__name__}")


def _lora_reference(model: nn.Module, inputs: Any) -> Tensor:
    """``F`` of an ``NMTuneLoraModel``: its features with the adapter disabled, in eval mode."""
    inner = _unwrap(model)
    if not _is_lora_model(inner):
        raise TypeError(
            f"precompute computes F itself only for an NMTuneLoraModel; for {type(inner).__name__} pass "
            "features_fn=lambda model, inputs: ..."
        )
    was_training = inner.training
    inner.eval()
    try:
        with inner.peft_model.disable_adapter():
            if isinstance(inputs, Mapping):  # the model takes no labels: they are the loss's
                out = inner(**{k: v for k, v in inputs.items() if k not in _LABEL_COLUMNS}, compute_reference=False)
            else:
                out = inner(inputs, compute_reference=False)
    finally:
        inner.train(was_training)
    return out.features
