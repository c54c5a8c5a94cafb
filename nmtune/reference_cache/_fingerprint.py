"""What the reference features ``F`` of a model depend on: :func:`model_fingerprint`.

:func:`_check_model` is what :meth:`ReferenceCache.check_model
<nmtune.reference_cache.ReferenceCache.check_model>` runs: it refuses a model whose
reference path is random, and one whose fingerprint differs from the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmtune._validation import check_module
from nmtune.lora._utils import check_not_merged, lora_layers, unwrap_model
from nmtune.lora.model import NMTuneLoraModel

_SAMPLES_PER_TENSOR = 64

# what each part of the fingerprint covers, for the message that says what changed
_PARTS = {"architecture": "parameter names/shapes/dtypes", "weights": "base weights", "reference": "reference settings"}


def _lora_model(model: nn.Module) -> NMTuneLoraModel | None:
    """``model`` unwrapped, if it is an ``NMTuneLoraModel``."""
    inner = unwrap_model(model)
    return inner if isinstance(inner, NMTuneLoraModel) else None


def _frozen_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The tensors ``F`` depends on: frozen parameters and buffers (LoRA weights excluded)."""
    skip = ("lora_", "modules_to_save.")
    named = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    named += list(model.named_buffers())
    return [(n, t) for n, t in named if not any(s in n for s in skip)]


def _sample_bytes(t: Tensor) -> bytes:
    if t.is_meta:
        return b"meta"
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    idx = torch.linspace(0, n - 1, steps=min(n, _SAMPLES_PER_TENSOR), device=flat.device).long()
    return flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _reference_settings(model: nn.Module) -> dict[str, Any]:
    lora = _lora_model(model)
    if lora is None:
        return {"class": type(unwrap_model(model)).__name__}
    pooling = lora.pooling if isinstance(lora.pooling, str) else getattr(lora.pooling, "__qualname__", "custom")
    cfg = lora.peft_model.peft_config[lora.peft_model.active_adapter]
    return {
        "class": type(lora.base_model).__name__,
        "pooling": pooling,
        "reference_eval": lora.reference_eval,
        "freeze_batchnorm": lora.freeze_batchnorm,
        "init_lora_weights": str(getattr(cfg, "init_lora_weights", None)),
        "bias": str(getattr(cfg, "bias", None)),
    }


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """A cheap fingerprint of what the reference features ``F`` of ``model`` depend on.

    Three parts, so that a mismatch can say what changed:

    * ``"architecture"``: names, shapes and dtypes of every frozen tensor;
    * ``"weights"``: 64 evenly spaced values of every frozen tensor plus all of the
      last one (cheap, not cryptographic: a change confined to a few values can go
      unnoticed, which the verification on the first hits catches);
    * ``"reference"``: the settings of the reference path (for an
      :class:`nmtune.NMTuneLoraModel`: pooling, ``reference_eval``,
      ``freeze_batchnorm``, the adapter's ``init_lora_weights`` and ``bias``).

    For an ``NMTuneLoraModel`` the frozen tensors are the base model's (the LoRA
    weights and the head do not enter ``F``); for any other module, the parameters
    with ``requires_grad=False`` and the buffers.

    Example:
        >>> net = nn.Linear(3, 2).requires_grad_(False)
        >>> fp = model_fingerprint(net)
        >>> sorted(fp)
        ['architecture', 'reference', 'weights']
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> model_fingerprint(net)["weights"] == fp["weights"]
        False
    """
    check_module("model", model)
    lora = _lora_model(model)
    tensors = _frozen_tensors(lora.base_model if lora is not None else unwrap_model(model))
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, t in tensors:
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        weights.update(_sample_bytes(t))
    if tensors and not tensors[-1][1].is_meta:
        weights.update(tensors[-1][1].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = json.dumps(_reference_settings(model), sort_keys=True)
    return {
        "architecture": arch.hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "reference": settings,
    }


def _check_deterministic(model: nn.Module) -> None:
    """Refuse a model whose reference path is random or depends on the batch."""
    lora = _lora_model(model)
    if lora is not None:
        if not lora.reference_eval:
            raise ValueError(
                "the model computes F with reference_eval=False, i.e. in training mode (dropout active, BatchNorm on "
                "batch statistics), so F is not a function of the example and cannot be cached; wrap it with "
                "reference_eval=True"
            )
        check_not_merged(lora_layers(lora.peft_model))
        return
    inner = unwrap_model(model)
    params = list(inner.parameters())
    if not params and not list(inner.buffers()):
        raise ValueError(f"{type(inner).__name__} has no parameters or buffers to fingerprint")
    if params and all(p.requires_grad for p in params):
        raise ValueError(
            f"every parameter of {type(inner).__name__} requires grad, so its features change as it trains and cannot "
            "be cached; pass the frozen reference model (e.g. copy.deepcopy(model).requires_grad_(False).eval())"
        )
    training = [n or type(inner).__name__ for n, m in inner.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{len(training)} module(s) of {type(inner).__name__} are in training mode (e.g. {training[:3]}): dropout "
            "and batch statistics make the reference features random; call .eval() on the reference model"
        )


def _check_model(model: nn.Module, recorded: dict[str, str] | None, path: Path | None) -> dict[str, str]:
    """The fingerprint of ``model``, checked for a cache.

    Refuses a model whose reference path is random and, when ``recorded`` is given, one
    whose fingerprint differs from it (the message names the changed parts and ``path``).
    """
    _check_deterministic(model)
    fingerprint = model_fingerprint(model)
    if recorded is not None and fingerprint != recorded:
        changed = [
            f"{_PARTS[k]} ({recorded.get(k)} -> {fingerprint.get(k)})"
            for k in sorted(_PARTS) if recorded.get(k) != fingerprint.get(k)
        ]
        where = f" at {path}" if path is not None else ""
        raise ValueError(
            f"the reference cache{where} was built for a different model: {', '.join(changed)} changed; "
            "its F would be wrong for this one: use a new cache"
        )
    return fingerprint
