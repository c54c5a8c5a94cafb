"""Saving and loading an :class:`NMTuneLoraModel`: PEFT's adapter files plus the head and a JSON record."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from nmtune._validation import check_bool
from nmtune.lora._utils import check_lora_config, import_peft, place_like, unwrap_model
from nmtune.lora.adapters import adapter_for
from nmtune.lora._state import (  # noqa: F401  (save_model, load_adapter_state re-exported)
    FORMAT_VERSION, META_FILE, load_adapter_state, load_head_state, save_model,
)
from nmtune.lora.model import NMTuneLoraModel

__all__ = ["load_lora", "save_model", "load_adapter_state"]

_META_KEYS = ("family", "num_classes", "feature_dim", "head", "nmtune_config")

def _read_meta(path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder (str or os.PathLike); got {type(path).__name__}")
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no {META_FILE} in path {path}; was it saved with NMTuneLoraModel.save_pretrained?")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta['format_version']}; this nmtune reads {FORMAT_VERSION}")
    return meta


def _head_for(meta: dict[str, Any], head: nn.Module | None, base: nn.Module, path: Any, trainable: bool) -> Any:
    if not meta.get("has_head"):
        return None
    if head is None:
        if meta.get("head") != "linear":
            raise ValueError("the model was saved with a custom head; pass head=<module of the same shape>")
        head = nn.Linear(int(meta["feature_dim"]), int(meta["num_classes"]))
    head = place_like(head, base)  # the model's device and dtype, as wrap_lora places a new head
    head.load_state_dict(load_head_state(path, next(head.parameters()).device))
    return head.requires_grad_(trainable)


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    is_trainable: bool = False,
    head: nn.Module | None = None,
    pooling: str | Callable[[Tensor, Tensor | None], Tensor] | None = None,
    compute_reference: bool | None = None,
) -> NMTuneLoraModel:
    """Load an adapter and head saved by :meth:`NMTuneLoraModel.save_pretrained`.

    Args:
        model: A fresh copy of the same base model (changed in place by PEFT).
        path: The folder written by ``save_pretrained``.
        is_trainable: Keep the adapter and head trainable (to continue training).
        head: The module for a custom head (saved as ``"custom"``); its weights are
            loaded from the folder.
        pooling: Needed only if the model was saved with a custom pooling callable.
        compute_reference: Override the saved setting.

    Returns:
        An :class:`NMTuneLoraModel` whose outputs equal the saved model's; the new
        head takes the base model's device and floating dtype.

    Example:
        >>> import tempfile, torch
        >>> from transformers import BertConfig, BertModel
        >>> from nmtune.lora import wrap_lora
        >>> def base():
        ...     torch.manual_seed(0)
        ...     return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                                 intermediate_size=64))
        >>> trained = wrap_lora(base(), num_classes=2)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     trained.save_pretrained(folder)
        ...     again = load_lora(base(), folder).eval()
        >>> again.head.out_features
        2
    """
    peft = import_peft()
    if not isinstance(unwrap_model(model), nn.Module):
        raise TypeError(f"model must be an nn.Module (a fresh copy of the base model); got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or os.PathLike); got {type(path).__name__}")
    check_bool("is_trainable", is_trainable)
    if compute_reference is not None:
        check_bool("compute_reference", compute_reference)
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module or None; got {type(head).__name__}")
    meta = _read_meta(path)
    base = unwrap_model(model)
    if isinstance(base, peft.PeftModel):
        raise TypeError("load_lora needs the plain base model; got a PeftModel that already holds adapters")
    adapter = adapter_for(base)
    if meta.get("family", adapter.family) != adapter.family:
        raise ValueError(
            f"{path} holds an adapter for a {meta['family']} model; got a {adapter.family} model "
            f"({type(base).__name__})"
        )
    saved_pooling = meta.get("pooling", "auto")
    if pooling is None and saved_pooling == "custom":
        raise ValueError("the model was saved with a custom pooling callable; pass pooling=... to load_lora")
    pooling = adapter.resolve_pooling(base, saved_pooling if pooling is None else pooling)
    check_lora_config(peft.PeftConfig.from_pretrained(str(path)))
    head = _head_for(meta, head, base, path, is_trainable)  # before PEFT changes the model in place
    peft_model = peft.PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
    return NMTuneLoraModel(
        peft_model,
        head=head,
        pooling=pooling,
        compute_reference=meta.get("compute_reference", True) if compute_reference is None else compute_reference,
        reference_eval=meta.get("reference_eval", True),
        freeze_batchnorm=meta.get("freeze_batchnorm", True),
        meta={k: meta[k] for k in _META_KEYS if k in meta},
        adapter=adapter,
    )
