"""The wrapped model: :class:`NMTuneLoraModel` returns ``(logits, features Z, reference F)``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from nmtune.lora._utils import check_not_merged, eval_mode, lora_layers
from nmtune.lora.adapters import ModelAdapter, adapter_for

__all__ = ["NMTuneLoraModel", "NMTuneLoraOutput"]

_CACHE_METHODS = ("check_model", "lookup", "store")


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


def _check_keys(keys: Any) -> Tensor:
    if not isinstance(keys, Tensor) or keys.dim() != 1 or keys.is_floating_point() or keys.dtype == torch.bool:
        got = f"{keys.dtype} tensor of shape {tuple(keys.shape)}" if isinstance(keys, Tensor) else type(keys).__name__
        raise TypeError(f"reference_keys must be a 1-D integer tensor (one key per row); got {got}")
    return keys


class NMTuneLoraModel(nn.Module):
    """A PEFT LoRA model that returns ``(logits, features Z, reference F)``.

    Build it with :func:`wrap_lora` (new adapter) or :func:`load_lora` (saved one).
    The reference ``F`` comes from the same weights with the adapter disabled, under
    ``no_grad`` and, by default, with every submodule in eval mode (no dropout, no
    BatchNorm statistics update), so it equals the pre-trained model's output. With
    a reference cache (:meth:`set_reference_cache`) ``F`` is read back for the
    examples already seen instead of being recomputed.

    Attributes:
        peft_model: The ``peft.PeftModel`` (adapters injected into the base model).
        head: The new classifier ``Z -> logits`` (``None`` when the model's own
            head is used).
        pooling: The pooling mode (``"pre_logits"`` for timm models).
        adapter: The :class:`nmtune.lora.adapters.ModelAdapter` of the model's family.
        compute_reference: Whether ``forward`` computes ``F``.
        reference_eval: Whether ``F`` is computed in eval mode.
        freeze_batchnorm: Whether the base's BatchNorm layers stay in eval mode
            (running statistics frozen) while training.
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
        super().__init__()
        self.peft_model = peft_model
        self.head = head
        self.pooling = pooling
        self.compute_reference = bool(compute_reference)
        self.reference_eval = bool(reference_eval)
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self._meta = dict(meta or {})
        base = peft_model.get_base_model()
        self.adapter = adapter if adapter is not None else adapter_for(base)
        self.adapter.prepare(base, pooling)
        # plain lists (not registered submodules): the merged-adapter check and BatchNorm freezing
        self._tuner_layers = lora_layers(peft_model)
        self._batchnorms = [m for m in peft_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._reference_cache: Any = None
        self.training = bool(peft_model.training)  # keep the caller's mode
        if self.freeze_batchnorm and self.training:
            for m in self._batchnorms:
                m.eval()

    # -- public helpers -------------------------------------------------------------
    def train(self, mode: bool = True) -> NMTuneLoraModel:
        """Set the training mode; BatchNorm layers of the base stay in eval mode
        when ``freeze_batchnorm`` (their running statistics are pre-trained weights:
        updating them would move the reference ``F`` away from the pre-trained model
        and they are not part of the saved adapter)."""
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for m in self._batchnorms:
                m.eval()
        return self

    @property
    def base_model(self) -> nn.Module:
        """The underlying model (with LoRA layers injected)."""
        return self.peft_model.get_base_model()

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

    @property
    def reference_cache(self) -> Any:
        """The reference cache set by :meth:`set_reference_cache`, or ``None``."""
        return self._reference_cache

    def set_reference_cache(self, cache: Any) -> None:
        """Read ``F`` from ``cache`` for examples already seen (``None`` removes it).

        The cache provides ``check_model(model)`` (called here once: it refuses a
        model whose reference path it cannot serve), ``lookup(keys) -> Tensor |
        None`` (every row's ``F`` in the model's dtype on ``keys.device``, or
        ``None`` unless all keys are cached) and ``store(keys, features)``. With a
        cache set, ``forward`` needs ``reference_keys``; a hit skips the
        adapter-disabled reference pass, a miss runs it and stores the result.

        Example:
            >>> model.set_reference_cache(cache)                    # doctest: +SKIP
            >>> out = model(**batch, reference_keys=batch_indices)  # doctest: +SKIP
        """
        if cache is not None:
            missing = [m for m in _CACHE_METHODS if not callable(getattr(cache, m, None))]
            if missing:
                raise TypeError(
                    f"a reference cache needs methods {_CACHE_METHODS}; {type(cache).__name__} lacks {missing}"
                )
            cache.check_model(self)
        # object.__setattr__: a cache that is an nn.Module must not become a registered
        # submodule (its storage would enter state_dict, .to() and the optimizer's view).
        object.__setattr__(self, "_reference_cache", cache)

    def input_names(self) -> list[str]:
        """Batch columns the base model reads (a ``Trainer`` keeps these)."""
        return self.adapter.input_names(self.base_model)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for every parameter with ``requires_grad`` (LoRA and head)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Turn on activation checkpointing in the backbone.

        transformers models: ``activation_checkpointing_enable`` (or the older
        ``gradient_checkpointing_enable``), non-reentrant by default so that the
        frozen embeddings need no ``requires_grad`` hook; timm models:
        ``set_grad_checkpointing(True)``. The reference pass runs in eval mode
        under ``no_grad`` and is never checkpointed.

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

    # -- forward --------------------------------------------------------------------
    def _reference_pass(self, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        ctx = eval_mode(self.peft_model) if self.reference_eval else contextlib.nullcontext()
        with self.peft_model.disable_adapter(), torch.no_grad(), ctx:
            _, reference = self.adapter.features(self.peft_model, args, kwargs, self.pooling, False)
        return reference.detach()

    def _reference(self, args: tuple, kwargs: dict[str, Any], keys: Any, use_cache: bool) -> Tensor:
        cache = self._reference_cache if use_cache else None
        if cache is None:
            if keys is not None and use_cache:
                raise ValueError(
                    "reference_keys were given but no reference cache is set; call "
                    "model.set_reference_cache(cache) first, or drop reference_keys"
                )
            return self._reference_pass(args, kwargs)
        if keys is None:
            raise ValueError(
                "a reference cache is set, so forward needs reference_keys=<1-D integer tensor, one key per row> "
                "(or use_reference_cache=False for a batch from another dataset)"
            )
        keys = _check_keys(keys)
        cached = cache.lookup(keys)
        if cached is not None:
            return cached
        reference = self._reference_pass(args, kwargs)
        if reference.shape[0] != keys.shape[0]:
            raise ValueError(f"reference_keys has {keys.shape[0]} key(s) for a batch of {reference.shape[0]} row(s)")
        cache.store(keys, reference)
        return reference

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
            raise ValueError(
                "NMTuneLoraModel computes no loss from labels (its output is logits, features Z and reference F): "
                "train it with nmtune.integrations.NMTuneTrainer instead of transformers.Trainer, or compute "
                "NMTuneLoss()(out.logits, labels, out.features, out.reference) yourself"
            )
        if compute_reference is None:
            compute_reference = self.compute_reference
        check_not_merged(self._tuner_layers)
        reference = self._reference(args, kwargs, reference_keys, use_reference_cache) if compute_reference else None
        own_logits, z = self.adapter.features(self.peft_model, args, kwargs, self.pooling, self.head is None)
        if reference is not None and reference.shape != z.shape:
            raise ValueError(
                f"the reference features have shape {tuple(reference.shape)} but Z has {tuple(z.shape)} "
                "(a reference cache built for another model or batch?)"
            )
        logits = self.head(z) if self.head is not None else own_logits
        if logits is None:
            raise ValueError(f"{type(self.base_model).__name__} returned no logits; wrap it with num_classes=...")
        return NMTuneLoraOutput(logits, z, reference)

    # -- save / load ----------------------------------------------------------------
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
        from nmtune.lora._state import save_model

        save_model(self, save_directory, **kwargs)

    def load_adapter_state(self, directory: str | os.PathLike) -> None:
        """Load saved adapter and head weights into this model (used to resume training)."""
        from nmtune.lora._state import load_adapter_state

        load_adapter_state(self, directory)
