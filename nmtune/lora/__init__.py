"""NMTune for LoRA tuning: :func:`wrap_lora`, :func:`load_lora`, :class:`NMTuneLoraModel`.

With LoRA the adapters reshape the backbone's features themselves, so there is no
extra MLP: the regularizers act on the adapted model's pooled features ``Z`` and the
consistency term compares them with the same model's features with the adapter
switched off, ``F`` (PEFT's ``disable_adapter()``; no second copy of the weights).

```
x ─► backbone + LoRA ─► pool ─► Z ─► head ─► logits
x ─► backbone (adapter disabled, no_grad, eval) ─► pool ─► F
```

Layout: ``adapters`` (one class per model family: transformers encoders,
transformers decoders, timm; the first match in ``ADAPTERS`` wins), ``pooling``
(token pooling and the pooling a checkpoint declares), ``backbone`` (the family
side of the model: adapter, BatchNorm freezing, checkpointing), ``reference`` (``F``
and the reference-cache protocol), ``model`` (:class:`NMTuneLoraModel`), ``wrap``
(:func:`wrap_lora`) and ``io`` (:func:`load_lora`; the saved files are ``_state``'s).
``peft`` is an optional dependency: ``pip install "nmtune[lora]"``.
"""

from __future__ import annotations

from nmtune.lora._utils import unwrap_model
from nmtune.lora.adapters import ADAPTERS, ModelAdapter, adapter_for, default_target_modules
from nmtune.lora.io import load_lora
from nmtune.lora.model import NMTuneLoraModel, NMTuneLoraOutput
from nmtune.lora.pooling import POOLING_MODES, pool_tokens
from nmtune.lora.wrap import wrap_lora

__all__ = [
    "wrap_lora",
    "load_lora",
    "NMTuneLoraModel",
    "NMTuneLoraOutput",
    "default_target_modules",
    "pool_tokens",
    "POOLING_MODES",
    "ADAPTERS",
    "ModelAdapter",
    "adapter_for",
    "unwrap_model",
]
