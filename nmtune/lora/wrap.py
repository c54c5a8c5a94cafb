"""Building an :class:`NMTuneLoraModel`: :func:`wrap_lora` adds new LoRA adapters to a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nmtune._validation import check_bool, check_int, check_real
from nmtune.lora._utils import (
    check_init_and_bias,
    check_lora_config,
    check_not_merged,
    import_peft,
    lora_layers,
    module_name,
    place_like,
    unwrap_model,
)
from nmtune.config import resolve_config
from nmtune.lora.adapters import ModelAdapter, adapter_for
from nmtune.lora.model import NMTuneLoraModel

__all__ = ["wrap_lora"]


def _resolve_reference(config: Any, compute_reference: bool | None) -> bool:
    if compute_reference is not None:
        return check_bool("compute_reference", compute_reference)
    return True if config is None else resolve_config(config, {}).uses_consistency


def _check_arguments(
    r: Any, alpha: Any, dropout: Any, num_classes: Any, feature_dim: Any, head: Any, target_modules: Any,
    **flags: Any,
) -> None:
    """Refuse a wrap_lora argument of the wrong type or range; ``flags`` are the boolean ones."""
    check_int("r", r, minimum=1)
    if alpha is not None and check_real("alpha", alpha) <= 0:
        raise ValueError(f"alpha must be > 0 (or None for alpha = r); got {alpha!r}")
    if check_real("dropout", dropout, minimum=0.0) >= 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=1)
    if feature_dim is not None:
        check_int("feature_dim", feature_dim, minimum=1)
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module (Z -> logits) or None; got {type(head).__name__}")
    if target_modules is not None and not isinstance(target_modules, str) and not (
        isinstance(target_modules, Sequence) and target_modules and all(isinstance(t, str) for t in target_modules)
    ):
        raise TypeError(
            "target_modules must be a regular expression (str), a non-empty list of module names, or None; "
            f"got {target_modules!r}"
        )
    for name, flag in flags.items():
        check_bool(name, flag)


def _split_peft(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """``(peft_model or None, base model)``; an existing PeftModel must hold one unmerged LoRA adapter."""
    peft = import_peft()
    if not isinstance(model, peft.PeftModel):
        return None, model
    if len(model.peft_config) != 1:
        raise ValueError(f"wrap_lora expects a PeftModel with one adapter; got {sorted(model.peft_config)}")
    check_lora_config(model.peft_config[model.active_adapter])
    check_not_merged(lora_layers(model))
    return model, model.get_base_model()


def _new_lora_config(
    adapter: ModelAdapter, base: nn.Module, own: nn.Module | None, r: int, alpha: float | None,
    dropout: float, target_modules: Any, lora_kwargs: dict[str, Any],
) -> Any:
    """A ``peft.LoraConfig`` from wrap_lora's arguments; ``own`` is the model's own head to train, if any."""
    kw = {**adapter.lora_defaults(base), **lora_kwargs}
    check_init_and_bias(kw.get("init_lora_weights"), kw.get("bias"))
    name = module_name(base, own) if own is not None else None
    if name:
        kw["modules_to_save"] = list(kw.get("modules_to_save") or []) + [name]
    targets = adapter.default_target_modules(base) if target_modules is None else target_modules
    return import_peft().LoraConfig(
        r=r,
        lora_alpha=float(r if alpha is None else alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
        **kw,
    )


def _inject_lora(
    adapter: ModelAdapter, base: nn.Module, lora_config: Any, own: nn.Module | None, r: int, alpha: float | None,
    dropout: float, target_modules: Any, lora_kwargs: dict[str, Any],
) -> nn.Module:
    """``peft.get_peft_model(base, ...)`` with ``lora_config``, or with one built by :func:`_new_lora_config`."""
    if lora_config is None:
        lora_config = _new_lora_config(adapter, base, own, r, alpha, dropout, target_modules, lora_kwargs)
    check_lora_config(lora_config)
    return import_peft().get_peft_model(base, lora_config)


def _head(
    adapter: ModelAdapter, base: nn.Module, own: nn.Module | None, head: nn.Module | None,
    num_classes: int | None, feature_dim: int | None,
) -> nn.Module | None:
    """The head on ``Z``: ``head``, a new ``nn.Linear(D, num_classes)``, or ``None`` for the model's own ``own``."""
    if head is None and num_classes is None and own is None:
        raise ValueError(f"{type(base).__name__} has no classification head; pass num_classes=... for a new one")
    if head is None and num_classes is not None:
        dim = feature_dim if feature_dim is not None else adapter.feature_dim(base)
        head = place_like(nn.Linear(dim, num_classes), base)
    return head


def _metadata(
    adapter: ModelAdapter, num_classes: int | None, feature_dim: int | None, head: nn.Module | None, config: Any
) -> dict[str, Any]:
    """The record ``save_pretrained`` writes besides the weights (family, classes, head kind, config)."""
    meta = {
        "family": adapter.family,
        "num_classes": num_classes,
        "feature_dim": int(head.in_features) if isinstance(head, nn.Linear) else feature_dim,
        "head": None if head is None else ("linear" if isinstance(head, nn.Linear) else "custom"),
    }
    if config is not None:
        meta["nmtune_config"] = resolve_config(config, {}).to_dict()
    return meta


def wrap_lora(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
    num_classes: int | None = None,
    pooling: str | Callable[[Tensor, Tensor | None], Tensor] = "auto",
    config: Any = None,
    compute_reference: bool | None = None,
    reference_eval: bool = True,
    freeze_batchnorm: bool = True,
    head: nn.Module | None = None,
    feature_dim: int | None = None,
    train_own_head: bool = True,
    lora_config: Any = None,
    **lora_kwargs: Any,
) -> NMTuneLoraModel:
    """Add LoRA adapters to ``model`` and return features for NMTune.

    The model is changed in place by ``peft.get_peft_model`` (LoRA layers injected,
    base weights frozen, never copied), once every argument is checked. The result's
    forward returns ``(logits, features Z, reference F)``: ``Z`` is the adapted pooled
    feature and ``F`` the same pooled feature with the adapter disabled, computed under
    ``no_grad`` in eval mode, bit-identical to the pre-trained model's. docs/lora.md
    has the per-family defaults, how ``pooling="auto"`` is resolved and which LoRA
    settings are refused, and why.

    Args:
        model: A transformers model (``AutoModel`` or a task model) or a timm model;
            a ``PeftModel`` with one LoRA adapter is accepted as is, and a DDP /
            DataParallel / compiled wrapper is unwrapped first.
        r: LoRA rank.
        alpha: LoRA alpha; ``None`` means ``r`` (scale 1, as in the authors' code).
        dropout: LoRA dropout.
        target_modules: Modules to adapt; ``None`` picks :func:`default_target_modules`.
        num_classes: If given, a new ``nn.Linear(D, num_classes)`` head on ``Z``,
            trained and saved with the adapter; otherwise the model's own head.
        pooling: transformers models: ``"cls"``, ``"mean"`` (attention-masked), ``"last"``
            (last non-pad token), ``"pooler"``, a callable ``(hidden, attention_mask) -> (B, D)``
            or ``"auto"`` (the checkpoint's sentence-transformers pooling, else the pooler,
            else ``"last"`` for decoders, ``"cls"`` for encoders). timm models: ``"auto"``.
        config: An ``NMTuneConfig`` or preset name; when its consistency term is
            off (``consistency_weight == 0`` or ``lambda_ == 0``) the reference is skipped.
        compute_reference: Force the reference on or off (overrides ``config``).
        reference_eval: Compute ``F`` with every submodule in eval mode (default;
            ``F`` is then deterministic and BatchNorm statistics are untouched).
        freeze_batchnorm: Keep the base's BatchNorm layers in eval mode while training
            (default), so ``F`` stays exact; with ``False`` they follow ``train()``.
        head: A custom ``Z -> logits`` module instead of the linear head.
        feature_dim: Width ``D`` of ``Z``; inferred when ``None``.
        train_own_head: Without ``num_classes``, train (and save, as PEFT
            ``modules_to_save``) the model's own classifier.
        lora_config: A full ``peft.LoraConfig``; then ``r``/``alpha``/``dropout``/
            ``target_modules`` and ``lora_kwargs`` are ignored.
        **lora_kwargs: More ``peft.LoraConfig`` fields (``use_dora``,
            ``init_lora_weights``, ``bias``, ``modules_to_save``, ...).

    Returns:
        An :class:`NMTuneLoraModel`.

    Raises:
        TypeError: For an argument of the wrong type (``r=2.0``, a ``head`` that is not a module, ...).
        ValueError: For an out-of-range number, LoRA settings under which the disabled adapter is not
            the pre-trained model (base-rewriting initialisations such as PiSSA, ``bias != "none"``,
            merged adapters), an unknown pooling, or a model without a head and no ``num_classes``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from nmtune import NMTuneLoss
        >>> model = wrap_lora(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64)), num_classes=3)
        >>> ids = torch.randint(0, 100, (4, 8))
        >>> out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        >>> loss = NMTuneLoss()(out.logits, torch.tensor([0, 1, 2, 0]), out.features, out.reference)
    """
    import_peft()  # without the extra, fail before anything else
    model = unwrap_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    _check_arguments(
        r, alpha, dropout, num_classes, feature_dim, head, target_modules,
        reference_eval=reference_eval, freeze_batchnorm=freeze_batchnorm, train_own_head=train_own_head,
    )
    with_reference = _resolve_reference(config, compute_reference)
    peft_model, base = _split_peft(model)

    # validate everything before get_peft_model changes the model in place
    adapter = adapter_for(base)
    pooling = adapter.resolve_pooling(base, pooling)
    own = adapter.classifier(base)
    head = _head(adapter, base, own, head, num_classes, feature_dim)
    if peft_model is None:
        owned = None if head is not None or not train_own_head else own
        peft_model = _inject_lora(adapter, base, lora_config, owned, r, alpha, dropout, target_modules, lora_kwargs)
    return NMTuneLoraModel(
        peft_model,
        head=head,
        pooling=pooling,
        compute_reference=with_reference,
        reference_eval=reference_eval,
        freeze_batchnorm=freeze_batchnorm,
        meta=_metadata(adapter, num_classes, feature_dim, head, config),
        adapter=adapter,
    )
