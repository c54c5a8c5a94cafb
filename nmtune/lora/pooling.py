"""Token pooling for transformers models, and the pooling a checkpoint folder declares.

``pool_tokens`` turns ``(B, T, D)`` token features into ``(B, D)``;
``sentence_transformers_pooling`` reads the pooling a sentence-transformers
checkpoint was trained with (``modules.json`` and its ``Pooling`` module's
``config.json``), which ``wrap_lora(pooling="auto")`` follows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmtune._validation import check_choice, check_same_device, check_tensor

__all__ = [
    "POOLING_MODES", "pool_tokens", "pool_output", "resolve_token_pooling", "sentence_transformers_pooling",
    "checkpoint_folder",
]

POOLING_MODES = ("auto", "cls", "mean", "last", "pooler", "pre_logits")
"""Names accepted by ``pooling`` (a callable ``(hidden, attention_mask) -> (B, D)`` also works)."""

_TOKEN_MODES = ("cls", "mean", "last")  # what pool_tokens computes
# sentence-transformers' Pooling config keys -> pool_tokens modes
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": None,  # not supported: masked maximum
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_sqrt_len_tokens": None,  # not supported: sum / sqrt(length)
    "pooling_mode_weightedmean_tokens": None,  # not supported: position-weighted mean
}


def pool_tokens(hidden: Tensor, mask: Tensor | None, mode: str) -> Tensor:
    """Pool ``(B, T, D)`` token features to ``(B, D)``.

    Args:
        hidden: Token features ``(B, T, D)``.
        mask: Attention mask ``(B, T)`` (1 = token, 0 = padding) or ``None``.
        mode: ``"cls"`` (first token), ``"mean"`` (attention-masked mean) or
            ``"last"`` (last non-pad token; right or left padding).

    Example:
        >>> h = torch.arange(12.0).reshape(1, 4, 3)
        >>> pool_tokens(h, torch.tensor([[1, 1, 0, 0]]), "last")
        tensor([[3., 4., 5.]])
    """
    check_choice("mode", mode, _TOKEN_MODES, what="pooling")
    check_tensor("hidden", hidden)
    if hidden.dim() != 3 or hidden.shape[1] < 1:
        raise ValueError(f"token pooling needs hidden states of shape (B, T, D) with T >= 1; got {tuple(hidden.shape)}")
    if mask is not None:
        check_tensor("attention_mask", mask, kind="any")
        if mask.is_complex():
            raise TypeError(f"attention_mask must hold 0/1 (bool, int or float); got dtype {mask.dtype}")
        check_same_device(hidden=hidden, attention_mask=mask)
    if mask is not None and mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; expected (B, T) = {tuple(hidden.shape[:2])}"
        )
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        if mask is None:
            return hidden.mean(dim=1)
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    if mask is None:  # "last"
        return hidden[:, -1]
    # index of the last non-pad position; works for right and left padding
    pos = torch.arange(mask.shape[1], device=mask.device)
    idx = (mask.to(torch.long) * pos).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def checkpoint_folder(model: nn.Module, filename: str = "modules.json") -> Path | None:
    """The local folder a transformers model was loaded from, if it holds ``filename``.

    A local path in ``name_or_path`` is used as is; a hub id is looked up in the
    local Hugging Face cache only (never the network).

    Example:
        >>> checkpoint_folder(nn.Linear(2, 2)) is None
        True
    """
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    if os.path.isdir(name):
        return Path(name) if os.path.isfile(os.path.join(name, filename)) else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ModuleNotFoundError:  # pragma: no cover - transformers always brings it
        return None
    try:
        found = try_to_load_from_cache(name, filename)
    except Exception:  # noqa: BLE001 - an id the cache cannot parse simply has no cached file
        return None
    return Path(found).parent if isinstance(found, str) and os.path.isfile(found) else None


def sentence_transformers_pooling(folder: str | os.PathLike) -> str | None:
    """The pooling mode a sentence-transformers checkpoint declares, or ``None``.

    Reads ``modules.json``, finds its ``sentence_transformers.models.Pooling``
    module and maps that module's ``config.json`` to a :func:`pool_tokens`
    mode (``"cls"``, ``"mean"`` or ``"last"``).

    Raises:
        ValueError: The folder declares a pooling :func:`pool_tokens` does not
            compute (``max``, ``mean_sqrt_len``, ``weightedmean``) or several modes at once
            (concatenated): pass ``pooling=`` explicitly then.

    Example:
        >>> sentence_transformers_pooling("no/such/folder") is None
        True
    """
    modules_path = Path(folder) / "modules.json"
    if not modules_path.is_file():
        return None
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if not pooling:
        return None
    config_path = Path(folder) / str(pooling[0].get("path", "")) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{modules_path} names a Pooling module but {config_path} does not exist")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    chosen = [key for key in _ST_MODES if config.get(key)]
    if len(chosen) != 1 or _ST_MODES[chosen[0]] is None:
        raise ValueError(
            f"{config_path} declares pooling {chosen or 'none'}; wrap_lora computes exactly one of cls, mean "
            "or lasttoken: pass pooling= explicitly ('cls', 'mean', 'last' or a callable)"
        )
    return _ST_MODES[chosen[0]]


def resolve_token_pooling(model: nn.Module, pooling: Any, *, has_pooler: bool, auto: Callable[[], str]) -> Any:
    """Check ``pooling`` for a transformers model's token features and resolve ``"auto"``.

    ``"auto"`` becomes the pooling the checkpoint folder declares
    (:func:`sentence_transformers_pooling`), else ``auto()`` (the family's default).

    Example:
        >>> resolve_token_pooling(nn.Linear(2, 2), "auto", has_pooler=False, auto=lambda: "cls")
        'cls'
    """
    if callable(pooling) and not isinstance(pooling, str):
        return pooling
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES} or a callable")
    if pooling == "pre_logits":
        raise ValueError("pooling='pre_logits' is for timm models; use 'cls', 'mean', 'last' or 'pooler'")
    if pooling == "pooler" and not has_pooler:
        raise ValueError(f"pooling='pooler' but {type(model).__name__} has no pooler; use 'cls', 'mean' or 'last'")
    if pooling != "auto":
        return pooling
    folder = checkpoint_folder(model)
    declared = sentence_transformers_pooling(folder) if folder is not None else None
    return declared or auto()


def pool_output(out: Any, mask: Tensor | None, pooling: Any, *, pooler_output: Tensor | None = None) -> Tensor:
    """The pooled features ``(B, D)`` of a transformers model output.

    Args:
        out: The model output (``last_hidden_state``, else the last of ``hidden_states``;
            ``pooler_output`` for ``pooling="pooler"``).
        mask: The attention mask ``(B, T)`` or ``None``.
        pooling: A :func:`pool_tokens` mode, ``"pooler"`` or a callable ``(hidden, mask) -> (B, D)``.
        pooler_output: The pooler's output caught by a hook, for outputs without ``pooler_output``.

    Example:
        >>> from types import SimpleNamespace
        >>> pool_output(SimpleNamespace(last_hidden_state=torch.ones(2, 3, 4)), None, "mean").shape
        torch.Size([2, 4])
    """
    if pooling == "pooler":
        z = getattr(out, "pooler_output", None)
        z = pooler_output if z is None else z
        if z is None:
            raise ValueError("pooling='pooler' but the model returned no pooler output")
        return z
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        states = getattr(out, "hidden_states", None)
        if not states:
            raise ValueError(f"{type(out).__name__} has neither last_hidden_state nor hidden_states to pool")
        hidden = states[-1]
    return pooling(hidden, mask) if callable(pooling) else pool_tokens(hidden, mask, pooling)
