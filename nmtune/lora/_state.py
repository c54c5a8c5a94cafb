"""The on-disk state of an :class:`~nmtune.lora.model.NMTuneLoraModel`: PEFT's adapter files,
the head (safetensors) and a JSON record. Below ``model`` and ``io``, so both can use it."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn

__all__ = [
    "HEAD_FILE",
    "META_FILE",
    "FORMAT_VERSION",
    "SavedStateMixin",
    "save_model",
    "load_head_state",
    "load_adapter_state",
]

HEAD_FILE = "nmtune_head.safetensors"
META_FILE = "nmtune_lora.json"
FORMAT_VERSION = 1


def save_model(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Write ``model``'s adapter, head and record to ``save_directory`` (see ``NMTuneLoraModel.save_pretrained``)."""
    from safetensors.torch import save_file

    os.makedirs(save_directory, exist_ok=True)
    model.peft_model.save_pretrained(str(save_directory), **kwargs)
    if model.head is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        save_file(state, os.path.join(save_directory, HEAD_FILE), metadata={"format": "pt"})
    meta = {
        **model.metadata,
        "format_version": FORMAT_VERSION,
        "pooling": model.pooling if isinstance(model.pooling, str) else "custom",
        "compute_reference": model.compute_reference,
        "reference_eval": model.reference_eval,
        "freeze_batchnorm": model.freeze_batchnorm,
        "has_head": model.head is not None,
    }
    with open(os.path.join(save_directory, META_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)


def load_head_state(directory: str | os.PathLike, device: Any) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {HEAD_FILE} in {directory}; was it saved with NMTuneLoraModel.save_pretrained?")
    return load_file(path, device=str(device))


def load_adapter_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load saved adapter and head weights into ``model`` in place (used to resume training)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    device = next(model.parameters()).device
    weights = load_peft_weights(str(directory), device=str(device))
    result = set_peft_model_state_dict(model.peft_model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter weights in {directory} do not fit this model: {unexpected[:3]}...")
    if model.head is not None:
        model.head.load_state_dict(load_head_state(directory, device))


class SavedStateMixin:
    """The saved form of an :class:`~nmtune.lora.model.NMTuneLoraModel`: its record (:attr:`metadata`,
    :attr:`nmtune_config`) and its folder (:meth:`save_pretrained`, :meth:`load_adapter_state`).

    The model provides ``_meta`` (the record), ``peft_model``, ``head``, ``pooling`` and the flags
    that :func:`save_model` writes.
    """

    _meta: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        """What :meth:`save_pretrained` records besides the weights (family, classes, head kind, config)."""
        return dict(self._meta)

    @property
    def nmtune_config(self) -> Any:
        """The :class:`nmtune.NMTuneConfig` the model was wrapped with, or ``None``."""
        saved = self._meta.get("nmtune_config")
        if not saved:
            return None
        from nmtune.loss import NMTuneConfig

        return NMTuneConfig.from_dict(saved)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the adapter (PEFT format) and the new head in one folder.

        Writes PEFT's ``adapter_config.json`` / ``adapter_model.safetensors`` plus
        ``nmtune_head.safetensors`` (the head) and ``nmtune_lora.json`` (pooling,
        classes, flags). Reload with :func:`load_lora`.

        Args:
            save_directory: Target folder (created if needed).
            **kwargs: Passed to ``PeftModel.save_pretrained``.

        Example:
            >>> model.save_pretrained("runs/lora")             # doctest: +SKIP
            >>> again = load_lora(fresh_base_model, "runs/lora")  # doctest: +SKIP
        """
        save_model(self, save_directory, **kwargs)

    def load_adapter_state(self, directory: str | os.PathLike) -> None:
        """Load saved adapter and head weights into this model (used to resume training)."""
        load_adapter_state(self, directory)
