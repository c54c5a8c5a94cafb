"""The wrapped model: :class:`NMTuneLoraModel` returns ``(logits, features Z, reference F)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor, nn

from nmtune.lora._state import SavedStateMixin
from nmtune.lora._utils import check_not_merged
from nmtune.lora.adapters import ModelAdapter
from nmtune.lora.backbone import LoraBackbone
from nmtune.lora.reference import check_cache, check_reference_shape, reference_features

__all__ = ["NMTuneLoraModel", "NMTuneLoraOutput"]

_NO_LOSS = (
    "NMTuneLoraModel computes no loss from labels (its output is logits, features Z and reference F): "
    "train it with nmtune.integrations.NMTuneTrainer instead of transformers.Trainer, or compute "
    "NMTuneLoss()(out.logits, labels, out.features, out.reference) yourself"
)


class NMTuneLoraOutput(NamedTuple):
    """What :class:`NMTuneLoraModel` returns.

    Attributes:
        logits: Classifier output ``(B, num_classes)``.
        features: The adapted, pooled features ``Z`` ``(B, D)`` (differentiable).
        reference: The same model's pooled features with the adapter disabled,
            ``F`` ``(B, D)``, computed under ``no_grad`` (or read from the
            reference cache); ``None`` when skipped.
    """

    logits: Tensor
    features: Tensor
    reference: Tensor | None


class NMTuneLoraModel(SavedStateMixin, LoraBackbone):
    """A PEFT LoRA model that returns ``(logits, features Z, reference F)``.

    Build it with :func:`wrap_lora` (new adapter) or :func:`load_lora` (saved one).
    The reference ``F`` comes from the same weights with the adapter disabled, under
    ``no_grad`` and, by default, with every submodule in eval mode (no dropout, no
    BatchNorm statistics update), so it equals the pre-trained model's output. With
    a reference cache (:meth:`set_reference_cache`) ``F`` is read back for the
    examples already seen instead of being recomputed (:mod:`nmtune.lora.reference`).
    The family side (``peft_model``, ``pooling``, ``adapter``, ``freeze_batchnorm``,
    checkpointing) comes from :class:`~nmtune.lora.backbone.LoraBackbone`, saving from
    :class:`~nmtune.lora._state.SavedStateMixin`.

    Attributes:
        head: The new classifier ``Z -> logits`` (``None`` when the model's own
            head is used).
        compute_reference: Whether ``forward`` computes ``F``.
        reference_eval: Whether ``F`` is computed in eval mode.
    """

    # Tell transformers' Trainer that this forward takes no loss kwargs: the NMTune loss is a
    # per-batch mean, so the Trainer divides it by the gradient accumulation steps.
    accepts_loss_kwargs = False

    def __init__(
        self,
        peft_model: nn.Module,
        *,
        head: nn.Module | None,
        pooling: str | Callable[[Tensor, Tensor | None], Tensor],
        compute_reference: bool = True,
        reference_eval: bool = True,
        freeze_batchnorm: bool = True,
        meta: dict[str, Any] | None = None,
        adapter: ModelAdapter | None = None,
    ) -> None:
        super().__init__(peft_model, pooling=pooling, freeze_batchnorm=freeze_batchnorm, adapter=adapter)
        self.head = head
        self.compute_reference = bool(compute_reference)
        self.reference_eval = bool(reference_eval)
        self._meta = dict(meta or {})
        self._reference_cache: Any = None

    @property
    def reference_cache(self) -> Any:
        """The reference cache set by :meth:`set_reference_cache`, or ``None``."""
        return self._reference_cache

    def set_reference_cache(self, cache: Any) -> None:
        """Read ``F`` from ``cache`` for examples already seen (``None`` removes it).

        ``cache`` follows the protocol of :mod:`nmtune.lora.reference` (``check_model``,
        called here once, ``lookup`` and ``store``); with it, ``forward`` needs ``reference_keys``.

        Example:
            >>> model.set_reference_cache(cache)                    # doctest: +SKIP
            >>> out = model(**batch, reference_keys=batch_indices)  # doctest: +SKIP
        """
        if cache is not None:
            check_cache(cache, self)
        # object.__setattr__: a cache that is an nn.Module must not become a registered
        # submodule (its storage would enter state_dict, .to() and the optimizer's view).
        object.__setattr__(self, "_reference_cache", cache)

    def forward(
        self,
        *args: Any,
        labels: Tensor | None = None,
        reference_keys: Tensor | None = None,
        compute_reference: bool | None = None,
        use_reference_cache: bool = True,
        **kwargs: Any,
    ) -> NMTuneLoraOutput:
        """Run the adapted model and, unless disabled, the frozen reference.

        Args:
            *args: Positional inputs of the base model (timm: the image batch).
            labels: Refused when given: this model computes no loss. Use
                :class:`nmtune.NMTuneLoss` on its outputs or
                :class:`nmtune.integrations.NMTuneTrainer` (the parameter exists
                so that transformers' ``Trainer`` finds the label column).
            reference_keys: One integer key per row identifying the example;
                required when a reference cache is set.
            compute_reference: Override :attr:`compute_reference` for this call.
            use_reference_cache: ``False`` computes ``F`` without the cache
                (e.g. for evaluation batches whose keys are not training keys).
            **kwargs: Keyword inputs of the base model (``input_ids``,
                ``attention_mask``, ...; timm also takes ``pixel_values``).

        Returns:
            :class:`NMTuneLoraOutput` ``(logits, features, reference)``.
        """
        if labels is not None:
            raise ValueError(_NO_LOSS)
        if compute_reference is None:
            compute_reference = self.compute_reference
        check_not_merged(self._tuner_layers)
        reference = (
            reference_features(self, args, kwargs, reference_keys, use_reference_cache) if compute_reference else None
        )
        own_logits, z = self.adapter.features(self.peft_model, args, kwargs, self.pooling, self.head is None)
        check_reference_shape(reference, z)
        logits = self.head(z) if self.head is not None else own_logits
        if logits is None:
            raise ValueError(f"{type(self.base_model).__name__} returned no logits; wrap it with num_classes=...")
        return NMTuneLoraOutput(logits, z, reference)
