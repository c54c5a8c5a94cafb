"""NMTune for transformers' ``Trainer``: :class:`NMTuneTrainer`.

A drop-in ``Trainer`` whose ``compute_loss`` adds the NMTune regularizers to the
task loss of a model that returns ``logits``, ``features`` (Z) and ``reference``
(F), such as :func:`nmtune.wrap_lora`'s. The loss terms are accumulated on the
device, detached, and their means are logged on the Trainer's logging steps only
(one host sync per log, none per step). ``pip install "nmtune[lora]"``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError('NMTuneTrainer needs the "transformers" package: pip install "nmtune[lora]"') from err

from nmtune.lora import NMTuneLoraModel, _unwrap
from nmtune.loss import NMTuneConfig, NMTuneLoss

__all__ = ["NMTuneTrainer", "LOGGED_COMPONENTS"]

LOGGED_COMPONENTS = ("task", "regularizer", "consistency", "covariance", "singular_value", "sve", "lsvr")
"""Fields of :class:`nmtune.LossComponents` that :class:`NMTuneTrainer` logs."""


def _unpack(outputs: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(outputs, dict):
        get = outputs.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(outputs, key, default)

    logits, features = get("logits"), get("features")
    if not isinstance(logits, Tensor) or not isinstance(features, Tensor):
        raise TypeError(
            "NMTuneTrainer needs a model whose output has tensors `logits` and `features` (and optionally "
            f"`reference`), e.g. nmtune.wrap_lora(...); got {type(outputs).__name__}"
        )
    return logits, features, get("reference")


class NMTuneTrainer(Trainer):
    """transformers ``Trainer`` with the NMTune loss.

    ``compute_loss`` computes ``task_loss(logits, labels) + lambda (w_mse L_MSE(Z, F)
    + w_cov L_COV(Z) + w_svd L_SVD(Z))`` with :class:`nmtune.NMTuneLoss`. The loss
    is a per-batch mean (the regularizers are batch statistics), so the Trainer
    divides it by the gradient-accumulation steps; ``num_items_in_batch`` is
    accepted and not used. Each term is logged as ``nmtune_<term>`` (training) and
    ``eval_nmtune_<term>`` (evaluation), averaged over the steps since the last log.
    Checkpoints of an :class:`nmtune.NMTuneLoraModel` hold only the adapter and the
    head (:meth:`NMTuneLoraModel.save_pretrained`) and resume from them.

    Args:
        *args: As for ``transformers.Trainer``.
        nmtune_config: ``NMTuneConfig`` or preset name; ``None`` takes the config
            the model was wrapped with, else ``"paper"``.
        task_loss: ``callable(logits, labels) -> scalar``; default cross-entropy.
        **kwargs: As for ``transformers.Trainer``.

    Example:
        >>> from transformers import TrainingArguments
        >>> model = wrap_lora(AutoModel.from_pretrained(path), num_classes=2)  # doctest: +SKIP
        >>> args = TrainingArguments("runs/x", logging_steps=10, report_to="none")  # doctest: +SKIP
        >>> NMTuneTrainer(model=model, args=args, train_dataset=ds).train()  # doctest: +SKIP
    """

    # The NMTune loss is a per-batch mean: let the Trainer scale it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        nmtune_config: NMTuneConfig | str | None = None,
        task_loss: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if nmtune_config is None:
            inner = self._nmtune_model()
            saved = inner._meta.get("nmtune_config") if inner is not None else None
            nmtune_config = NMTuneConfig.from_dict(saved) if saved else "paper"
        self.nmtune_loss = NMTuneLoss(nmtune_config, task_loss=task_loss)
        # never forward num_items_in_batch to the model, never expect a pre-scaled loss
        self.model_accepts_loss_kwargs = False
        self._nmtune_sums: dict[str, Tensor | None] = {"train": None, "eval": None}
        self._nmtune_counts: dict[str, int] = {"train": 0, "eval": 0}

    # -- helpers --------------------------------------------------------------------------
    def _nmtune_model(self) -> NMTuneLoraModel | None:
        model = _unwrap(self.accelerator.unwrap_model(self.model)) if hasattr(self, "accelerator") else self.model
        return model if isinstance(model, NMTuneLoraModel) else None

    def _accumulate(self, split: str, comp: Any) -> None:
        values = torch.stack([getattr(comp, name).detach().float() for name in LOGGED_COMPONENTS])
        total = self._nmtune_sums[split]
        self._nmtune_sums[split] = values if total is None else total + values
        self._nmtune_counts[split] += 1

    def _flush(self, split: str, logs: dict[str, float], prefix: str) -> None:
        total, count = self._nmtune_sums[split], self._nmtune_counts[split]
        self._nmtune_sums[split], self._nmtune_counts[split] = None, 0
        if total is None or count == 0:
            return
        means = total / count
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        for name, value in zip(LOGGED_COMPONENTS, means.tolist()):  # the one host sync per log
            logs[f"{prefix}{name}"] = round(value, 6)

    # -- Trainer hooks ----------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Task loss plus the NMTune regularizers; components accumulated for logging.

        Args:
            model: The (possibly DDP-wrapped) model.
            inputs: The batch; ``labels`` is taken out and the rest passed to the model.
            return_outputs: Also return ``{"logits": ...}`` (for evaluation).
            num_items_in_batch: Accepted for the Trainer's signature; unused, as the
                loss is a per-batch mean.
        """
        del num_items_in_batch
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(f"NMTuneTrainer needs `labels` in each batch; got keys {sorted(inputs)}")
        outputs = model(**inputs)
        logits, features, reference = _unpack(outputs)
        if reference is None and self.nmtune_loss.config.uses_consistency:
            raise ValueError(
                "the NMTune config has a consistency term (mse_weight > 0) but the model returned no reference "
                "features; wrap the model with compute_reference=True or use a config with mse_weight=0"
            )
        comp = self.nmtune_loss(logits, labels, features, reference, return_components=True)
        self._accumulate("train" if model.training else "eval", comp)
        if return_outputs:
            return comp.loss, {"logits": logits}
        return comp.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged NMTune terms to the Trainer's training / evaluation logs."""
        if "loss" in logs:
            self._flush("train", logs, "nmtune_")
        if any(k.startswith("eval_") for k in logs):
            self._flush("eval", logs, "eval_nmtune_")
        super().log(logs, *args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        inner = self._nmtune_model()
        if inner is not None and self._signature_columns is None:
            import inspect

            base = inner.base_model
            forward = base.forward if not callable(getattr(base, "forward_features", None)) else inner.forward
            names = list(inspect.signature(forward).parameters)
            self._signature_columns = names + ["labels", "label", "label_ids", "pixel_values"]
            return
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._nmtune_model()
        if inner is None:
            super()._save(output_dir, state_dict=state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        inner.save_pretrained(output_dir)
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)  # < 4.46: tokenizer
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        inner = _unwrap(model) if model is not None else self._nmtune_model()
        if isinstance(inner, NMTuneLoraModel):
            inner.load_adapter_state(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _load_best_model(self) -> None:
        inner = self._nmtune_model()
        if inner is not None and self.state.best_model_checkpoint:
            inner.load_adapter_state(self.state.best_model_checkpoint)
            return
        super()._load_best_model()
