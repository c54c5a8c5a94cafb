"""Model-family adapters: how ``nmtune.lora`` reads features from each kind of model.

One adapter per family owns everything that differs between families: whether a
model belongs to it, its classifier, its feature width, its default LoRA targets
and pooling, how one pass gives ``(own logits, pooled features)``, activation
checkpointing, and the input names a ``Trainer`` must keep. :func:`adapter_for`
returns a fresh instance of the first class in :data:`ADAPTERS` that matches
(PEFT's dispatch pattern), so a new family is one class inserted at the front::

    ADAPTERS.insert(0, MyFamilyAdapter)
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from nmtune._validation import check_module
from nmtune.lora._utils import import_peft, unwrap_model
from nmtune.lora.pooling import pool_output, resolve_token_pooling

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "TimmAdapter",
    "TransformersDecoderAdapter",
    "TransformersEncoderAdapter",
    "adapter_for",
    "default_target_modules",
]

# Default LoRA targets by transformers ``model_type`` (encoders and decoders).
_HF_TARGETS: dict[str, list[str]] = {
    **{t: ["query", "key", "value"] for t in (
        "bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "xmod",
        "megatron-bert", "nomic_bert", "albert",
    )},
    "mpnet": ["q", "k", "v"],
    "modernbert": ["Wqkv"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
}
_DECODER_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom", "falcon", "llama", "mistral", "mixtral", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
    "starcoder2", "codegen", "stablelm", "smollm3", "granite",
})


def _transformers_targets(model: nn.Module) -> list[str]:
    """Default LoRA targets of a transformers model: nmtune's table by ``model_type``, else PEFT's.

    Example:
        >>> _transformers_targets(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: no default LoRA targets for Linear (neither a transformers nor a timm model); ...
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ValueError(
            f"no default LoRA targets for {type(model).__name__} (neither a transformers nor a timm model); "
            "pass target_modules=[...]"
        )
    mtype = str(config.model_type or "")
    if mtype in _HF_TARGETS:
        return list(_HF_TARGETS[mtype])
    table = import_peft().utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    if mtype in table:
        return list(table[mtype])
    raise ValueError(f"no default LoRA targets for model_type {mtype!r}; pass target_modules=[...]")


def _check_dim(model: nn.Module, dim: Any) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(
            f"cannot infer the feature width of {type(model).__name__} (got {dim!r}); pass feature_dim=..."
        )
    return dim


class ModelAdapter:
    """How ``nmtune.lora`` reads one model family; one instance per wrapped model.

    Subclasses override :meth:`matches` and the methods below; instances may keep
    per-model state (e.g. a hooked pooler output).
    """

    family = "generic"
    """Saved in ``nmtune_lora.json``."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (the base model, unwrapped)."""
        raise NotImplementedError

    def classifier(self, model: nn.Module) -> nn.Module | None:
        """The model's own classification head, or ``None``."""
        raise NotImplementedError

    def feature_dim(self, model: nn.Module) -> int:
        """The width ``D`` of the pooled features."""
        raise NotImplementedError

    def default_target_modules(self, model: nn.Module) -> list[str] | str:
        """LoRA target modules when the user names none."""
        raise NotImplementedError

    def lora_defaults(self, model: nn.Module) -> dict[str, Any]:
        """Extra ``peft.LoraConfig`` fields this family needs (the user's values win)."""
        return {}

    def resolve_pooling(self, model: nn.Module, pooling: Any) -> Any:
        """Validate ``pooling`` for this family and turn ``"auto"`` into a concrete mode."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, pooling: Any) -> None:
        """Per-model setup once the pooling is known (hooks, flags)."""

    def features(
        self, peft_model: nn.Module, args: tuple, kwargs: dict[str, Any], pooling: Any, own_logits: bool
    ) -> tuple[Tensor | None, Tensor]:
        """``(own-head logits or None, pooled features)`` for one pass of the current adapter state."""
        raise NotImplementedError

    def set_checkpointing(
        self, model: nn.Module, enable: bool, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Turn activation checkpointing on or off in the backbone."""
        raise NotImplementedError

    def input_names(self, model: nn.Module) -> list[str]:
        """Names of the batch columns the model reads (a ``Trainer`` keeps these)."""
        return list(inspect.signature(model.forward).parameters)


class TimmAdapter(ModelAdapter):
    """timm models: ``Z = forward_head(forward_features(x), pre_logits=True)``."""

    family = "timm"
    _IMAGE_KEYS = ("pixel_values", "x", "input", "images")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))

    def classifier(self, model: nn.Module) -> nn.Module | None:
        getter = getattr(model, "get_classifier", None)
        head = getter() if callable(getter) else None
        return None if not isinstance(head, nn.Module) or isinstance(head, nn.Identity) else head

    def feature_dim(self, model: nn.Module) -> int:
        return _check_dim(model, getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None))

    def default_target_modules(self, model: nn.Module) -> list[str] | str:
        cls = type(model).__name__
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if "qkv" in names and "blocks" in {n.split(".", 1)[0] for n, _ in model.named_modules()}:
            return ["qkv", "fc1", "fc2"]
        if cls == "ConvNeXt" and {"fc1", "fc2"} <= names:
            return ["fc1", "fc2"]
        if cls == "ResNet":
            return r".*layer\d+\.\d+\.conv\d+"
        head = self.classifier(model)
        linear = [
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not n.startswith(("head", "fc."))
        ]
        if linear:
            return sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"no default LoRA targets for timm model {cls}; pass target_modules=[...]")

    def resolve_pooling(self, model: nn.Module, pooling: Any) -> Any:
        if callable(pooling) and not isinstance(pooling, str):
            raise ValueError("a custom pooling callable applies to transformers token features, not timm models")
        if pooling not in ("auto", "pre_logits"):
            raise ValueError(
                f"timm models are pooled by their own head (pre_logits features); got pooling={pooling!r}, "
                "use 'auto'"
            )
        return "pre_logits"

    def features(
        self, peft_model: nn.Module, args: tuple, kwargs: dict[str, Any], pooling: Any, own_logits: bool
    ) -> tuple[Tensor | None, Tensor]:
        base = peft_model.get_base_model()
        if args:
            x = args[0]
        else:
            keys = [k for k in self._IMAGE_KEYS if k in kwargs]
            if not keys:
                raise TypeError(
                    "a timm model needs the image batch as the first argument or pixel_values=...; "
                    f"got keyword arguments {sorted(kwargs)}"
                )
            x = kwargs[keys[0]]
        z = base.forward_head(base.forward_features(x), pre_logits=True)
        return (self.classifier(base)(z) if own_logits else None), z  # type: ignore[misc]

    def set_checkpointing(
        self, model: nn.Module, enable: bool, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """timm's ``set_grad_checkpointing(enable)``."""
        model.set_grad_checkpointing(enable)

    def input_names(self, model: nn.Module) -> list[str]:
        return list(self._IMAGE_KEYS)


class TransformersEncoderAdapter(ModelAdapter):
    """transformers encoders (and any model whose output has ``last_hidden_state``).

    Pooled by the checkpoint's sentence-transformers pooling when its folder
    declares one, else the model's own pooler, else the CLS token.
    """

    family = "transformers"

    def __init__(self) -> None:
        self._pooler_out: Tensor | None = None
        self._needs_hidden = False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True  # the fallback: token features from last_hidden_state / hidden_states

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        base = getattr(model, "base_model", None)
        return base if isinstance(base, nn.Module) else model

    def _pooler(self, model: nn.Module) -> nn.Module | None:
        pooler = getattr(self._backbone(model), "pooler", None)
        return pooler if isinstance(pooler, nn.Module) else None

    def classifier(self, model: nn.Module) -> nn.Module | None:
        for name in ("classifier", "score"):
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def feature_dim(self, model: nn.Module) -> int:
        return _check_dim(model, getattr(getattr(model, "config", None), "hidden_size", None))

    def default_target_modules(self, model: nn.Module) -> list[str] | str:
        return _transformers_targets(model)

    def _auto_pooling(self, model: nn.Module) -> str:
        return "pooler" if self._pooler(model) is not None else "cls"

    def resolve_pooling(self, model: nn.Module, pooling: Any) -> Any:
        has_pooler = self._pooler(model) is not None
        return resolve_token_pooling(model, pooling, has_pooler=has_pooler, auto=lambda: self._auto_pooling(model))

    def prepare(self, model: nn.Module, pooling: Any) -> None:
        # task models (BertForSequenceClassification, ...) return no last_hidden_state
        self._needs_hidden = self._backbone(model) is not model
        if pooling == "pooler":
            pooler = self._pooler(model)
            if pooler is None:  # validated by resolve_pooling; kept for load_lora of edited models
                raise ValueError(f"pooling='pooler' but {type(model).__name__} has no pooler")
            pooler.register_forward_hook(self._remember_pooler)

    def _remember_pooler(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self._pooler_out = output

    def features(
        self, peft_model: nn.Module, args: tuple, kwargs: dict[str, Any], pooling: Any, own_logits: bool
    ) -> tuple[Tensor | None, Tensor]:
        call_kwargs = dict(kwargs)
        if self._needs_hidden and pooling != "pooler":
            call_kwargs["output_hidden_states"] = True
        self._pooler_out = None
        out = peft_model(*args, **call_kwargs)
        logits = getattr(out, "logits", None) if own_logits else None
        hooked, self._pooler_out = self._pooler_out, None
        return logits, pool_output(out, kwargs.get("attention_mask"), pooling, pooler_output=hooked)

    def set_checkpointing(
        self, model: nn.Module, enable: bool, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """``activation_checkpointing_enable`` (or the older ``gradient_checkpointing_enable``), non-reentrant
        by default, so that the frozen embeddings need no ``requires_grad`` hook."""
        if not enable:
            model.gradient_checkpointing_disable()
            return
        kw = dict(checkpointing_kwargs or {"use_reentrant": False})
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if kw.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


class TransformersDecoderAdapter(TransformersEncoderAdapter):
    """transformers decoders (GPT-2, Llama, ...): pooled by the last non-pad token."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            return False
        return bool(getattr(config, "is_decoder", False)) or str(config.model_type) in _DECODER_TYPES

    def _auto_pooling(self, model: nn.Module) -> str:
        return "last"

    def lora_defaults(self, model: nn.Module) -> dict[str, Any]:
        if getattr(model.config, "model_type", "") == "gpt2":
            return {"fan_in_fan_out": True}  # GPT-2's Conv1D stores weights transposed
        return {}


ADAPTERS: list[type[ModelAdapter]] = [TimmAdapter, TransformersDecoderAdapter, TransformersEncoderAdapter]
"""Adapter classes in dispatch order: the first whose ``matches`` is true wins."""


def adapter_for(model: nn.Module) -> ModelAdapter:
    """A fresh adapter for ``model`` (the first match in :data:`ADAPTERS`).

    Example:
        >>> type(adapter_for(nn.Linear(2, 2))).__name__
        'TransformersEncoderAdapter'
    """
    check_module("model", model)
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise ValueError(f"no model adapter matches {type(model).__name__}; add one to nmtune.lora.adapters.ADAPTERS")


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The LoRA target modules :func:`wrap_lora` picks when none are given.

    BERT/RoBERTa-style encoders: the attention projections (``query``, ``key``,
    ``value``); GPT-2: ``c_attn`` and ``c_proj``; other transformers models:
    PEFT's own table; timm ViT: ``qkv``, ``fc1``, ``fc2``; timm ConvNeXt: the MLP
    ``fc1``/``fc2`` of every block; timm ResNet: the convolutions inside the residual
    blocks (a regular expression); any other timm model: every ``nn.Linear`` but the
    classifier.

    Args:
        model: The base model (not yet wrapped).

    Returns:
        A list of module-name suffixes, or a regular expression (``str``).

    Raises:
        ValueError: If no default is known; pass ``target_modules`` then.

    Example:
        >>> import timm
        >>> default_target_modules(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32))
        ['qkv', 'fc1', 'fc2']
    """
    model = unwrap_model(model)
    return adapter_for(model).default_target_modules(model)

