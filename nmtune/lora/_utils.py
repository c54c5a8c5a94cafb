"""Private helpers of ``nmtune.lora``: the lazy ``peft`` import, wrapper stripping, and
the LoRA settings under which ``disable_adapter()`` would not give the base model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from nmtune._validation import check_module

# LoRA initialisations that rewrite the base weights: with them ``disable_adapter()``
# no longer gives the pre-trained model, so the reference F would be wrong.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def import_peft() -> Any:
    """``peft``, or ``ModuleNotFoundError`` naming the extra that installs it."""
    try:
        import peft
    except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
        raise ModuleNotFoundError('nmtune.lora needs the "peft" package: pip install "nmtune[lora]"') from err
    return peft


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / ``torch.compile`` wrappers (the adapters live on the inner model).

    Example:
        >>> unwrap_model(torch.compile(nn.Linear(2, 2))).__class__.__name__
        'Linear'
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    check_module("model", model)

    for _ in range(8):
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The qualified name of ``module`` inside ``model`` (``None`` if absent)."""
    for name, sub in model.named_modules():
        if sub is module:
            return name
    return None


def check_init_and_bias(init: Any, bias: Any) -> None:
    """Refuse initialisations that rewrite the base weights and trained base biases."""
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weights, so disable_adapter() would no longer give the "
            "pre-trained model and the reference features F would be wrong; use init_lora_weights=True "
            "(or 'gaussian', 'eva', 'orthogonal')"
        )
    if bias not in (None, "none"):
        raise ValueError(
            f"bias={bias!r} trains the base biases, which disable_adapter() does not undo, so the "
            "reference features F would drift from the pre-trained model; use bias='none'"
        )


def check_lora_config(lora_config: Any) -> None:
    """Refuse LoRA settings under which ``disable_adapter()`` would not give the base model."""
    peft = import_peft()
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"wrap_lora needs a LoRA adapter (peft.LoraConfig); got {type(lora_config).__name__}")
    check_init_and_bias(lora_config.init_lora_weights, lora_config.bias)
    if getattr(lora_config, "kasa_config", None) is not None:
        raise ValueError(
            "kasa_config truncates the base weights, so disable_adapter() would no longer give the pre-trained "
            "model and the reference features F would be wrong; drop kasa_config"
        )


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every PEFT tuner layer inside ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def check_not_merged(layers: Sequence[nn.Module]) -> None:
    """Refuse merged adapters: the base weights would then include the LoRA update."""
    merged = [type(m).__name__ for m in layers if getattr(m, "merged", False)]
    if merged:
        raise ValueError(
            f"{len(merged)} LoRA layer(s) have merged adapters (merge_adapter() was called): the base weights then "
            "include the LoRA update and the reference features F would be wrong; call unmerge_adapter() first"
        )


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode (dropout off, BatchNorm stats frozen)."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def place_like(module: nn.Module, model: nn.Module) -> nn.Module:
    """``module`` on the device, and in the floating dtype, of ``model``'s first parameter."""
    param = next(model.parameters(), None)
    if param is None:
        return module
    return module.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
