"""The backbone layer of an :class:`~nmtune.lora.model.NMTuneLoraModel`: a PEFT model driven through
its family's :class:`~nmtune.lora.adapters.ModelAdapter`, with nothing of NMTune (no head, no reference
``F``, no saved record). Below ``model``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor, nn

from nmtune.lora._utils import lora_layers
from nmtune.lora.adapters import ModelAdapter, adapter_for

__all__ = ["LoraBackbone"]

_Self = TypeVar("_Self", bound="LoraBackbone")


class LoraBackbone(nn.Module):
    """A PEFT LoRA model and the adapter of its family; the base class of :class:`NMTuneLoraModel`.

    It owns what depends on the model family: the adapter (set up once for ``pooling``),
    BatchNorm freezing, activation checkpointing and the batch columns a ``Trainer``
    keeps. Subclasses define ``forward`` (one pass is
    ``adapter.features(peft_model, args, kwargs, pooling, own_logits)``).

    Attributes:
        peft_model: The ``peft.PeftModel`` (adapters injected into the base model).
        pooling: The pooling mode (``"pre_logits"`` for timm models).
        adapter: The :class:`nmtune.lora.adapters.ModelAdapter` of the model's family.
        freeze_batchnorm: Whether the base's BatchNorm layers stay in eval mode
            (running statistics frozen) while training.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        *,
        pooling: str | Callable[[Tensor, Tensor | None], Tensor],
        freeze_batchnorm: bool = True,
        adapter: ModelAdapter | None = None,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.pooling = pooling
        self.freeze_batchnorm = bool(freeze_batchnorm)
        base = peft_model.get_base_model()
        self.adapter = adapter if adapter is not None else adapter_for(base)
        self.adapter.prepare(base, pooling)
        # plain lists (not registered submodules): the merged-adapter check and BatchNorm freezing
        self._tuner_layers = lora_layers(peft_model)
        self._batchnorms = [m for m in peft_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.training = bool(peft_model.training)  # keep the caller's mode
        self._keep_batchnorm_frozen()

    def _keep_batchnorm_frozen(self) -> None:
        if self.training and self.freeze_batchnorm:
            for m in self._batchnorms:
                m.eval()

    def train(self: _Self, mode: bool = True) -> _Self:
        """Set the training mode; BatchNorm layers of the base stay in eval mode
        when ``freeze_batchnorm`` (their running statistics are pre-trained weights:
        updating them would move the reference ``F`` away from the pre-trained model
        and they are not part of the saved adapter)."""
        super().train(mode)
        self._keep_batchnorm_frozen()
        return self

    @property
    def base_model(self) -> nn.Module:
        """The underlying model (with LoRA layers injected)."""
        return self.peft_model.get_base_model()

    def input_names(self) -> list[str]:
        """Batch columns the base model reads (a ``Trainer`` keeps these)."""
        return self.adapter.input_names(self.base_model)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for every parameter with ``requires_grad`` (LoRA and head)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Turn on activation checkpointing in the backbone, as its family does it
        (:meth:`nmtune.lora.adapters.ModelAdapter.set_checkpointing`). The reference
        pass runs in eval mode under ``no_grad`` and is never checkpointed.

        Example:
            >>> model.gradient_checkpointing_enable()  # doctest: +SKIP
        """
        self.adapter.set_checkpointing(self.base_model, True, gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Alias of :meth:`gradient_checkpointing_enable` (transformers >= 5 name)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off again."""
        self.adapter.set_checkpointing(self.base_model, False)
