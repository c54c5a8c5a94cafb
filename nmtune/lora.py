"""NMTune for LoRA tuning: :func:`wrap_lora`, :func:`load_lora`, :class:`NMTuneLoraModel`.

With LoRA the adapters reshape the backbone's features themselves, so there is no
extra MLP: the regularizers act on the adapted model's pooled features ``Z`` and the
consistency term compares them with the same model's features with the adapter
switched off, ``F`` (PEFT's ``disable_adapter()``; no second copy of the weights).

```
x ─► backbone + LoRA ─► pool ─► Z ─► head ─► logits
x ─► backbone (adapter disabled, no_grad, eval) ─► pool ─► F
```

Works with transformers models (encoders pooled by CLS token, masked mean, the
model's own pooler; decoders by their last non-pad token) and timm models (the
pre-logits features ``forward_head(forward_features(x), pre_logits=True)``).
``peft`` is an optional dependency: ``pip install "nmtune[lora]"``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "wrap_lora",
    "load_lora",
    "NMTuneLoraModel",
    "NMTuneLoraOutput",
    "default_target_modules",
    "pool_tokens",
    "POOLING_MODES",
]

POOLING_MODES = ("auto", "cls", "mean", "last", "pooler", "pre_logits")
"""Names accepted by ``pooling`` (a callable ``(hidden, attention_mask) -> (B, D)`` also works)."""

_HEAD_FILE = "nmtune_head.safetensors"
_META_FILE = "nmtune_lora.json"
_FORMAT_VERSION = 1

# LoRA initialisations that rewrite the base weights: with them ``disable_adapter()``
# no longer gives the pre-trained model, so the reference F would be wrong.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

# Default LoRA targets by transformers ``model_type``.
_HF_TARGETS: dict[str, list[str]] = {
    **{t: ["query", "key", "value"] for t in (
        "bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "mpnet", "data2vec-text", "xmod",
        "megatron-bert", "nomic_bert", "modernbert",
    )},
    "mpnet": ["q", "k", "v"],
    "modernbert": ["Wqkv"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "albert": ["query", "key", "value"],
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


class NMTuneLoraOutput(NamedTuple):
    """What :class:`NMTuneLoraModel` returns.

    Attributes:
        logits: Classifier output ``(B, num_classes)``.
        features: The adapted, pooled features ``Z`` ``(B, D)`` (differentiable).
        reference: The same model's pooled features with the adapter disabled,
            ``F`` ``(B, D)``, computed under ``no_grad``; ``None`` when skipped.
    """

    logits: Tensor
    features: Tensor
    reference: Tensor | None


# ----------------------------------------------------------------------------- helpers
def _import_peft() -> Any:
    try:
        import peft
    except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
        raise ModuleNotFoundError(
            'wrap_lora needs the "peft" package: pip install "nmtune[lora]"'
        ) from err
    return peft


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers (adapters live on the inner model)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _is_timm(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def _is_transformers(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "model_type")


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _hf_backbone(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def _hf_pooler(model: nn.Module) -> nn.Module | None:
    pooler = getattr(_hf_backbone(model), "pooler", None)
    return pooler if isinstance(pooler, nn.Module) else None


def _is_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) or _model_type(model) in _DECODER_TYPES


def _hf_head(model: nn.Module) -> nn.Module | None:
    for name in ("classifier", "score"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _timm_classifier(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        return None
    return head


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    return None


def _feature_dim(model: nn.Module) -> int:
    if _is_timm(model):
        dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    else:
        dim = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(
            f"cannot infer the feature width of {type(model).__name__} (got {dim!r}); pass feature_dim=..."
        )
    return dim


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
    model = _unwrap(model)
    if _is_timm(model):
        cls = type(model).__name__
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if "qkv" in names and "blocks" in {n.split(".", 1)[0] for n, _ in model.named_modules()}:
            return ["qkv", "fc1", "fc2"]
        if cls == "ConvNeXt" and {"fc1", "fc2"} <= names:
            return ["fc1", "fc2"]
        if cls == "ResNet":
            return r".*layer\d+\.\d+\.conv\d+"
        head = _timm_classifier(model)
        linear = [
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not n.startswith(("head", "fc."))
        ]
        if linear:
            return sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"no default LoRA targets for timm model {cls}; pass target_modules=[...]")
    if _is_transformers(model):
        mtype = _model_type(model)
        if mtype in _HF_TARGETS:
            return list(_HF_TARGETS[mtype])
        peft = _import_peft()
        table = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
        if mtype in table:
            return list(table[mtype])
        raise ValueError(f"no default LoRA targets for model_type {mtype!r}; pass target_modules=[...]")
    raise ValueError(
        f"no default LoRA targets for {type(model).__name__} (neither a transformers nor a timm model); "
        "pass target_modules=[...]"
    )


def _check_init_and_bias(init: Any, bias: Any) -> None:
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


def _check_lora_config(lora_config: Any) -> None:
    """Refuse LoRA settings under which ``disable_adapter()`` would not give the base model."""
    peft = _import_peft()
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"wrap_lora needs a LoRA adapter (peft.LoraConfig); got {type(lora_config).__name__}")
    _check_init_and_bias(lora_config.init_lora_weights, lora_config.bias)
    if getattr(lora_config, "kasa_config", None) is not None:
        raise ValueError(
            "kasa_config truncates the base weights, so disable_adapter() would no longer give the pre-trained "
            "model and the reference features F would be wrong; drop kasa_config"
        )


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _check_not_merged(layers: Sequence[nn.Module]) -> None:
    merged = [type(m).__name__ for m in layers if getattr(m, "merged", False)]
    if merged:
        raise ValueError(
            f"{len(merged)} LoRA layer(s) have merged adapters (merge_adapter() was called): the base weights then "
            "include the LoRA update and the reference features F would be wrong; call unmerge_adapter() first"
        )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode (dropout off, BatchNorm stats frozen)."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


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
    if hidden.dim() != 3:
        raise ValueError(f"token pooling needs hidden states of shape (B, T, D); got {tuple(hidden.shape)}")
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
    if mode == "last":
        if mask is None:
            return hidden[:, -1]
        # index of the last non-pad position; works for right and left padding
        pos = torch.arange(mask.shape[1], device=mask.device)
        idx = (mask.to(torch.long) * pos).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")


# ----------------------------------------------------------------------------- the model
class NMTuneLoraModel(nn.Module):
    """A PEFT LoRA model that returns ``(logits, features Z, reference F)``.

    Build it with :func:`wrap_lora` (new adapter) or :func:`load_lora` (saved one).
    The reference ``F`` comes from the same weights with the adapter disabled, under
    ``no_grad`` and, by default, with every submodule in eval mode (no dropout, no
    BatchNorm statistics update), so it equals the pre-trained model's output.

    Attributes:
        peft_model: The ``peft.PeftModel`` (adapters injected into the base model).
        head: The new classifier ``Z -> logits`` (``None`` when the model's own
            head is used).
        pooling: The pooling mode (``"pre_logits"`` for timm models).
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
        self._family = "timm" if _is_timm(base) else "transformers"
        # kept outside nn.Module registration: plain references for the merged-adapter check
        self.__dict__["_tuner_layers"] = _lora_layers(peft_model)
        self.__dict__["_pooler_out"] = None
        self.__dict__["_batchnorms"] = [
            m for m in peft_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.training = bool(peft_model.training)  # keep the caller's mode
        if self.freeze_batchnorm and self.training:
            for m in self.__dict__["_batchnorms"]:
                m.eval()
        # task models (BertForSequenceClassification, ...) return no last_hidden_state
        self._needs_hidden = self._family == "transformers" and _hf_backbone(base) is not base
        if self._family == "transformers" and pooling == "pooler":
            pooler = _hf_pooler(base)
            if pooler is None:  # validated in wrap_lora; kept for load_lora of edited models
                raise ValueError(f"pooling='pooler' but {type(base).__name__} has no pooler")
            pooler.register_forward_hook(self._remember_pooler)

    # -- public helpers -------------------------------------------------------------
    def train(self, mode: bool = True) -> NMTuneLoraModel:
        """Set the training mode; BatchNorm layers of the base stay in eval mode
        when ``freeze_batchnorm`` (their running statistics are pre-trained weights:
        updating them would move the reference ``F`` away from the pre-trained model
        and they are not part of the saved adapter)."""
        super().train(mode)
        if mode and self.freeze_batchnorm:
            for m in self.__dict__["_batchnorms"]:
                m.eval()
        return self

    @property
    def base_model(self) -> nn.Module:
        """The underlying model (with LoRA layers injected)."""
        return self.peft_model.get_base_model()

    def _remember_pooler(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.__dict__["_pooler_out"] = output

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
        base = self.base_model
        if self._family == "timm":
            base.set_grad_checkpointing(True)
            return
        kw = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:  # transformers < 5
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if kw.get("use_reentrant", True) and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """Alias of :meth:`gradient_checkpointing_enable` (transformers >= 5 name)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn activation checkpointing off again."""
        base = self.base_model
        if self._family == "timm":
            base.set_grad_checkpointing(False)
        else:
            base.gradient_checkpointing_disable()

    # -- forward --------------------------------------------------------------------
    def _features(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        """``(own-head logits or None, pooled features)`` for one pass of the current adapter state."""
        if self._family == "timm":
            base = self.base_model
            if args:
                x = args[0]
            else:
                keys = [k for k in ("pixel_values", "x", "input", "images") if k in kwargs]
                if not keys:
                    raise TypeError(
                        f"a timm model needs the image batch as the first argument or pixel_values=...; "
                        f"got keyword arguments {sorted(kwargs)}"
                    )
                x = kwargs[keys[0]]
            z = base.forward_head(base.forward_features(x), pre_logits=True)
            logits = None
            if self.head is None:
                logits = _timm_classifier(base)(z)  # type: ignore[misc]
            return logits, z

        mask = kwargs.get("attention_mask")
        pooling = self.pooling
        call_kwargs = dict(kwargs)
        if self._needs_hidden and pooling != "pooler":
            call_kwargs["output_hidden_states"] = True
        self.__dict__["_pooler_out"] = None
        out = self.peft_model(*args, **call_kwargs)
        logits = getattr(out, "logits", None) if self.head is None else None
        hooked, self.__dict__["_pooler_out"] = self.__dict__["_pooler_out"], None
        if pooling == "pooler":
            z = getattr(out, "pooler_output", None)
            if z is None:
                z = hooked
            if z is None:
                raise ValueError("pooling='pooler' but the model returned no pooler output")
            return logits, z
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            states = getattr(out, "hidden_states", None)
            if not states:
                raise ValueError(f"{type(out).__name__} has neither last_hidden_state nor hidden_states to pool")
            hidden = states[-1]
        if callable(pooling):
            z = pooling(hidden, mask)
        else:
            z = pool_tokens(hidden, mask, pooling)
        return logits, z

    def forward(self, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> NMTuneLoraOutput:
        """Run the adapted model and, unless disabled, the frozen reference.

        Args:
            *args: Positional inputs of the base model (timm: the image batch).
            labels: Accepted and ignored (the loss is computed by ``NMTuneLoss`` or
                ``NMTuneTrainer``), so Trainer batches can be passed as they are.
            **kwargs: Keyword inputs of the base model (``input_ids``,
                ``attention_mask``, ...; timm also takes ``pixel_values``).
                ``compute_reference=False/True`` overrides the default for this call.

        Returns:
            :class:`NMTuneLoraOutput` ``(logits, features, reference)``.
        """
        compute_reference = kwargs.pop("compute_reference", None)
        if compute_reference is None:
            compute_reference = self.compute_reference
        layers = self.__dict__["_tuner_layers"]
        _check_not_merged(layers)
        reference = None
        if compute_reference:
            ctx = _eval_mode(self.peft_model) if self.reference_eval else contextlib.nullcontext()
            with self.peft_model.disable_adapter(), torch.no_grad(), ctx:
                _, reference = self._features(args, kwargs)
            reference = reference.detach()
        own_logits, z = self._features(args, kwargs)
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
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        self.peft_model.save_pretrained(str(save_directory), **kwargs)
        if self.head is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
            save_file(state, os.path.join(save_directory, _HEAD_FILE), metadata={"format": "pt"})
        meta = {
            **self._meta,
            "format_version": _FORMAT_VERSION,
            "pooling": self.pooling if isinstance(self.pooling, str) else "custom",
            "compute_reference": self.compute_reference,
            "reference_eval": self.reference_eval,
            "freeze_batchnorm": self.freeze_batchnorm,
            "has_head": self.head is not None,
        }
        with open(os.path.join(save_directory, _META_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2, sort_keys=True)

    def load_adapter_state(self, directory: str | os.PathLike) -> None:
        """Load saved adapter and head weights into this model (used to resume training)."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        device = next(self.parameters()).device
        weights = load_peft_weights(str(directory), device=str(device))
        result = set_peft_model_state_dict(self.peft_model, weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"adapter weights in {directory} do not fit this model: {missing[:3]}...")
        if self.head is not None:
            self.head.load_state_dict(_load_head_state(directory, device))


def _load_head_state(directory: str | os.PathLike, device: torch.device | str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(directory, _HEAD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {_HEAD_FILE} in {directory}; was it saved with NMTuneLoraModel.save_pretrained?")
    return load_file(path, device=str(device))


def _resolve_reference(config: Any, compute_reference: bool | None) -> bool:
    if compute_reference is not None:
        return bool(compute_reference)
    if config is None:
        return True
    from nmtune.loss import NMTuneConfig

    cfg = NMTuneConfig.from_preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, NMTuneConfig):
        raise TypeError(f"config must be an NMTuneConfig or a preset name; got {type(cfg).__name__}")
    return cfg.uses_consistency


def _resolve_pooling(model: nn.Module, pooling: Any) -> Any:
    if callable(pooling) and not isinstance(pooling, str):
        if _is_timm(model):
            raise ValueError("a custom pooling callable applies to transformers token features, not timm models")
        return pooling
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES} or a callable")
    if _is_timm(model):
        if pooling not in ("auto", "pre_logits"):
            raise ValueError(
                f"timm models are pooled by their own head (pre_logits features); got pooling={pooling!r}, "
                "use 'auto'"
            )
        return "pre_logits"
    if pooling == "pre_logits":
        raise ValueError("pooling='pre_logits' is for timm models; use 'cls', 'mean', 'last' or 'pooler'")
    has_pooler = _hf_pooler(model) is not None
    if pooling == "pooler" and not has_pooler:
        raise ValueError(f"pooling='pooler' but {type(model).__name__} has no pooler; use 'cls', 'mean' or 'last'")
    if pooling == "auto":
        if has_pooler:
            return "pooler"
        return "last" if _is_decoder(model) else "cls"
    return pooling


# ----------------------------------------------------------------------------- builders
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
    base weights frozen, never copied). The result's forward returns
    ``(logits, features Z, reference F)``: ``Z`` is the adapted pooled feature and
    ``F`` the same pooled feature with the adapter disabled, computed under
    ``no_grad`` in eval mode, bit-identical to the pre-trained model's.

    Args:
        model: A transformers model (``AutoModel`` or a task model) or a timm model;
            a ``PeftModel`` with one LoRA adapter is accepted as is, and a DDP /
            DataParallel / compiled wrapper is unwrapped first.
        r: LoRA rank.
        alpha: LoRA alpha; ``None`` means ``r`` (scale 1, as in the authors' code).
        dropout: LoRA dropout.
        target_modules: Modules to adapt; ``None`` picks
            :func:`default_target_modules`.
        num_classes: If given, a new ``nn.Linear(D, num_classes)`` head on ``Z``,
            trained and saved with the adapter; otherwise the model's own head.
        pooling: transformers models: ``"cls"``, ``"mean"`` (attention-masked),
            ``"last"`` (last non-pad token), ``"pooler"`` (the model's own
            pooler) or ``"auto"`` (pooler if the model has one, ``"last"`` for
            decoders, else ``"cls"``); or a callable ``(hidden, attention_mask)
            -> (B, D)``. timm models: ``"auto"`` (pre-logits features).
        config: An ``NMTuneConfig`` or preset name; when its consistency term is
            off (``mse_weight == 0`` or ``lambda_ == 0``) the reference is skipped.
        compute_reference: Force the reference on or off (overrides ``config``).
        reference_eval: Compute ``F`` with every submodule in eval mode (default;
            ``F`` is then deterministic and BatchNorm statistics are untouched).
        freeze_batchnorm: Keep the base's BatchNorm layers in eval mode while
            training (default): their running statistics belong to the frozen
            pre-trained model, so ``F`` stays exact and the saved adapter and
            head determine the model. With ``False`` they follow ``train()``,
            ``F`` drifts with the updated statistics and ``save_pretrained``
            does not store them.
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
        ValueError: For a LoRA initialisation that rewrites the base weights
            (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA, KaSA), ``bias != "none"``,
            merged adapters, an unknown pooling, or a model without a head and
            no ``num_classes``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from nmtune import NMTuneLoss
        >>> model = wrap_lora(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64)), num_classes=3)
        >>> ids = torch.randint(0, 100, (4, 8))
        >>> out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        >>> loss = NMTuneLoss()(out.logits, torch.tensor([0, 1, 2, 0]), out.features, out.reference)
    """
    peft = _import_peft()
    model = _unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int or None; got {num_classes!r}")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int; got {r!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    with_reference = _resolve_reference(config, compute_reference)

    if isinstance(model, peft.PeftModel):
        peft_model = model
        if len(peft_model.peft_config) != 1:
            raise ValueError(
                f"wrap_lora expects a PeftModel with one adapter; got {sorted(peft_model.peft_config)}"
            )
        _check_lora_config(peft_model.peft_config[peft_model.active_adapter])
        _check_not_merged(_lora_layers(peft_model))
        base = peft_model.get_base_model()
    else:
        peft_model, base = None, model

    # validate everything before get_peft_model changes the model in place
    pooling = _resolve_pooling(base, pooling)
    own = _timm_classifier(base) if _is_timm(base) else _hf_head(base)
    if head is None and num_classes is None and own is None:
        raise ValueError(f"{type(base).__name__} has no classification head; pass num_classes=... for a new one")
    if head is None and num_classes is not None:
        dim = feature_dim if feature_dim is not None else _feature_dim(base)
        head = nn.Linear(dim, num_classes)
        param = next(base.parameters(), None)
        if param is not None:
            head = head.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)

    if peft_model is None:
        if lora_config is None:
            targets = default_target_modules(base) if target_modules is None else target_modules
            if isinstance(targets, (list, tuple)):
                targets = list(targets)
            kw = dict(lora_kwargs)
            _check_init_and_bias(kw.get("init_lora_weights"), kw.get("bias"))
            if _model_type(base) == "gpt2":
                kw.setdefault("fan_in_fan_out", True)  # GPT-2's Conv1D stores weights transposed
            if head is None and train_own_head:
                name = _module_name(base, own) if own is not None else None
                if name:
                    kw["modules_to_save"] = list(kw.get("modules_to_save") or []) + [name]
            lora_config = peft.LoraConfig(
                r=r,
                lora_alpha=float(r if alpha is None else alpha),
                lora_dropout=float(dropout),
                target_modules=targets,
                **kw,
            )
        _check_lora_config(lora_config)
        peft_model = peft.get_peft_model(base, lora_config)

    meta = {
        "family": "timm" if _is_timm(base) else "transformers",
        "num_classes": num_classes,
        "feature_dim": int(head.in_features) if isinstance(head, nn.Linear) else feature_dim,
        "head": None if head is None else ("linear" if isinstance(head, nn.Linear) else "custom"),
    }
    if config is not None:
        from nmtune.loss import NMTuneConfig

        cfg = NMTuneConfig.from_preset(config) if isinstance(config, str) else config
        meta["nmtune_config"] = cfg.to_dict()
    return NMTuneLoraModel(
        peft_model,
        head=head,
        pooling=pooling,
        compute_reference=with_reference,
        reference_eval=reference_eval,
        freeze_batchnorm=freeze_batchnorm,
        meta=meta,
    )


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
        An :class:`NMTuneLoraModel` whose outputs equal the saved model's.

    Example:
        >>> trained.save_pretrained("runs/lora")                       # doctest: +SKIP
        >>> model = load_lora(AutoModel.from_pretrained(path), "runs/lora").eval()  # doctest: +SKIP
    """
    peft = _import_peft()
    meta_path = os.path.join(path, _META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no {_META_FILE} in {path}; was it saved with NMTuneLoraModel.save_pretrained?")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("format_version", 0) > _FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta['format_version']}; this nmtune reads {_FORMAT_VERSION}")
    base = _unwrap(model)
    peft_config = peft.PeftConfig.from_pretrained(str(path))
    _check_lora_config(peft_config)
    peft_model = peft.PeftModel.from_pretrained(base, str(path), is_trainable=is_trainable)
    saved_pooling = meta.get("pooling", "auto")
    if pooling is None:
        if saved_pooling == "custom":
            raise ValueError("the model was saved with a custom pooling callable; pass pooling=... to load_lora")
        pooling = saved_pooling
    if meta.get("has_head"):
        if head is None:
            if meta.get("head") != "linear":
                raise ValueError("the model was saved with a custom head; pass head=<module of the same shape>")
            head = nn.Linear(int(meta["feature_dim"]), int(meta["num_classes"]))
        param = next(base.parameters())
        head = head.to(device=param.device)
        head.load_state_dict(_load_head_state(path, param.device))
        head.requires_grad_(is_trainable)
    pooling = pooling if callable(pooling) and not isinstance(pooling, str) else (
        "pre_logits" if _is_timm(base) else pooling
    )
    return NMTuneLoraModel(
        peft_model,
        head=head,
        pooling=pooling,
        compute_reference=meta.get("compute_reference", True) if compute_reference is None else compute_reference,
        reference_eval=meta.get("reference_eval", True),
        freeze_batchnorm=meta.get("freeze_batchnorm", True),
        meta={k: meta[k] for k in ("family", "num_classes", "feature_dim", "head", "nmtune_config") if k in meta},
    )
