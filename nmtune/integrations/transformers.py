"""NMTune for transformers' ``Trainer``: :class:`NMTuneTrainer`.

A drop-in ``Trainer`` whose ``compute_loss`` adds the NMTune regularizers to the
task loss of a model that returns ``logits``, ``features`` (Z) and ``reference``
(F), such as :func:`nmtune.wrap_lora`'s. The loss terms are accumulated on the
device, detached, and logged on the Trainer's logging steps only (one host sync
per log, none per step). ``pip install "nmtune[lora]"``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError('NMTuneTrainer needs the "transformers" package: pip install "nmtune[lora]"') from err

from nmtune.lora import NMTuneLoraModel, unwrap_model
from nmtune.lora.reference import split_keys
from nmtune.config import NMTuneConfig, resolve_config
from nmtune.loss import NMTuneLoss

__all__ = ["NMTuneTrainer", "LOGGED_COMPONENTS"]

LOGGED_COMPONENTS = ("task", "regularizer", "consistency", "covariance", "singular_value", "sve", "lsvr")
"""Fields of :class:`nmtune.LossComponents` that :class:`NMTuneTrainer` logs."""

_SPLITS = ("train", "train_total", "eval")


def _unpack(outputs: Any, needs_reference: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(logits, features, reference)`` of a model output (a dict or an object with those fields)."""
    get = outputs.get if isinstance(outputs, dict) else (lambda key: getattr(outputs, key, None))
    logits, features, reference = get("logits"), get("features"), get("reference")
    if not isinstance(logits, Tensor) or not isinstance(features, Tensor):
        raise TypeError(
            "NMTuneTrainer needs a model whose output has tensors `logits` and `features` (and optionally "
            f"`reference`), e.g. nmtune.wrap_lora(...); got {type(outputs).__name__}"
        )
    if reference is None and needs_reference:
        raise ValueError(
            "the NMTune config has a consistency term (consistency_weight > 0) but the model returned no reference "
            "features; wrap the model with compute_reference=True or use a config with consistency_weight=0"
        )
    return logits, features, reference


def _cache_counts(inner: NMTuneLoraModel | None, accelerator: Any, device: Any) -> dict[str, int]:
    """``nmtune_cache_hits`` / ``nmtune_cache_misses`` of the model's reference cache, summed over ranks."""
    cache = inner.reference_cache if inner is not None else None
    counts = [getattr(cache, name, None) for name in ("hits", "misses")]
    if cache is None or any(c is None for c in counts):
        return {}
    stats = torch.tensor([float(c) for c in counts], device=device)
    if accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, reduction="sum")
    hits, misses = (int(v) for v in stats.tolist())
    return {"nmtune_cache_hits": hits, "nmtune_cache_misses": misses}


def _trainer_config(config: Any, inner: NMTuneLoraModel | None) -> NMTuneConfig:
    """The loss config: given, else the wrapped model's, else "paper"; always ``small_batch="skip"``."""
    if config is None and inner is not None:
        config = inner.nmtune_config
    return resolve_config(config, {}, name="nmtune_config").replace(small_batch="skip")


def _model_inputs(inputs: dict[str, Any], key_column: str | None, training: bool) -> tuple[dict[str, Any], Tensor]:
    """The model's keyword inputs and the labels; the reference key column becomes ``reference_keys``
    in training and is dropped, with the cache bypassed, in evaluation (its keys are not training keys)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError(f"NMTuneTrainer needs `labels` in each batch; got keys {sorted(inputs)}")
    if key_column is None:
        return inputs, labels
    if not training:
        return _without_keys(inputs, key_column), labels
    keys, inputs = split_keys(inputs, key_column, name="reference_key_column")
    return {**inputs, "reference_keys": keys}, labels


def _without_keys(inputs: dict[str, Any], key_column: str) -> dict[str, Any]:
    """``inputs`` without the key column, for a pass that bypasses the reference cache."""
    return {**{k: v for k, v in inputs.items() if k != key_column}, "use_reference_cache": False}


class _TermSums:
    """Row-weighted sums of the logged terms per split, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | None] = dict.fromkeys(_SPLITS)
        self.batches: dict[str, int] = dict.fromkeys(_SPLITS, 0)

    def add(self, splits: tuple[str, ...], comp: Any, rows: int) -> None:
        """Add ``[rows * terms..., rows, skipped]`` to each split's sum."""
        terms = torch.stack([getattr(comp, name).detach().float() for name in LOGGED_COMPONENTS])
        weight = terms.new_tensor([float(rows)])
        values = torch.cat([terms * weight, weight, comp.skipped.detach().float().reshape(1)])
        for split in splits:
            total = self.sums[split]
            self.sums[split] = values if total is None else total + values
            self.batches[split] += 1

    def reset(self, split: str) -> None:
        self.sums[split], self.batches[split] = None, 0

    def flush(self, split: str, logs: dict[str, float], prefix: str, accelerator: Any, device: Any) -> None:
        """Write ``split``'s weighted means (and skip count) into ``logs`` and reset it; every rank reduces."""
        total = self.sums[split]
        self.reset(split)
        distributed = accelerator.num_processes > 1
        if total is None:
            if not distributed:
                return
            total = torch.zeros(len(LOGGED_COMPONENTS) + 2, device=device)  # every rank joins the reduce
        if distributed:
            total = accelerator.reduce(total, reduction="sum")
        values = total.tolist()  # the one host sync per log
        weight, skipped = values[-2], values[-1]
        if weight <= 0:
            return
        for name, value in zip(LOGGED_COMPONENTS, values):
            logs[f"{prefix}{name}"] = round(value / weight, 6)
        logs[f"{prefix}skipped_batches"] = int(skipped)


def _save_lora(inner: NMTuneLoraModel, output_dir: str, trainer: Trainer) -> None:
    """A checkpoint of an ``NMTuneLoraModel``: adapter and head, the processor, the training arguments."""
    os.makedirs(output_dir, exist_ok=True)
    inner.save_pretrained(output_dir)
    processor = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)  # < 4.46: tokenizer
    if processor is not None:
        processor.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))


class _AdapterCheckpoints:
    """``Trainer`` overrides for an :class:`nmtune.NMTuneLoraModel`: its input columns, and checkpoints
    that hold the adapter and the head only (saved, resumed and reloaded as best model)."""

    def _nmtune_model(self) -> NMTuneLoraModel | None:
        model = self.model  # type: ignore[attr-defined]
        if hasattr(self, "accelerator"):
            model = self.accelerator.unwrap_model(model)
        model = unwrap_model(model)
        return model if isinstance(model, NMTuneLoraModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        inner = self._nmtune_model()
        if inner is not None and self._signature_columns is None:
            extra = [self.reference_key_column] if self.reference_key_column else []
            self._signature_columns = inner.input_names() + ["labels", "label", "label_ids", "pixel_values"] + extra
            return
        super()._set_signature_columns_if_needed()
        if self.reference_key_column and self.reference_key_column not in self._signature_columns:
            self._signature_columns.append(self.reference_key_column)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        inner = self._nmtune_model()
        if inner is None:
            super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
            return
        if self.args.should_save:
            _save_lora(inner, output_dir if output_dir is not None else self.args.output_dir, self)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        inner = unwrap_model(model) if model is not None else self._nmtune_model()
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


class NMTuneTrainer(_AdapterCheckpoints, Trainer):
    """transformers ``Trainer`` with the NMTune loss (:class:`nmtune.NMTuneLoss`).

    The loss is a per-batch mean (the regularizers are batch statistics), so the
    Trainer divides it by the gradient-accumulation steps; ``num_items_in_batch``
    is not used. The config runs with ``small_batch="skip"``: a ragged last batch
    of one row trains on its task loss, counted as ``nmtune_skipped_batches``.
    Logged: ``nmtune_<term>`` on the logging steps, ``train_nmtune_<term>`` with
    the final ``train_loss`` (whole-run means), and ``eval_``/``test_`` prefixed
    terms in ``evaluate()``/``predict()``, weighted by rows as ``eval_loss`` is
    (docs/lora.md lists them). Checkpoints of an :class:`nmtune.NMTuneLoraModel`
    hold the adapter and the head only, and resume from them.

    Args:
        *args: As for ``transformers.Trainer``.
        nmtune_config: ``NMTuneConfig`` or preset name; ``None`` takes the config
            the model was wrapped with, else ``"paper"``.
        task_loss: ``callable(logits, labels) -> scalar``; default cross-entropy.
        reference_key_column: The dataset column of integer example keys (e.g.
            ``"idx"``) for the model's reference cache: kept by
            ``remove_unused_columns`` and passed as ``reference_keys`` in
            training (evaluation and prediction bypass the cache). The cache's
            ``hits``/``misses`` are logged as ``nmtune_cache_hits``/``_misses``.
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
        reference_key_column: str | None = None,
        **kwargs: Any,
    ) -> None:
        if reference_key_column is not None and (not isinstance(reference_key_column, str) or not reference_key_column):
            raise TypeError(f"reference_key_column must be a column name (str) or None; got {reference_key_column!r}")
        self.reference_key_column = reference_key_column
        super().__init__(*args, **kwargs)
        self.nmtune_loss = NMTuneLoss(_trainer_config(nmtune_config, self._nmtune_model()), task_loss=task_loss)
        # never forward num_items_in_batch to the model, never expect a pre-scaled loss
        self.model_accepts_loss_kwargs = False
        self._nmtune_terms = _TermSums()

    def _flush(self, split: str, logs: dict[str, float], prefix: str) -> None:
        self._nmtune_terms.flush(split, logs, prefix, self.accelerator, self.args.device)

    def _log_cache(self, logs: dict[str, float]) -> None:
        logs.update(_cache_counts(self._nmtune_model(), self.accelerator, self.args.device))

    # -- Trainer hooks ----------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Task loss plus the NMTune regularizers (``num_items_in_batch`` unused: a per-batch mean)."""
        del num_items_in_batch
        inputs, labels = _model_inputs(inputs, self.reference_key_column, model.training)
        logits, features, reference = _unpack(model(**inputs), self.nmtune_loss.config.uses_consistency)
        comp = self.nmtune_loss(logits, labels, features, reference, return_components=True)
        self._nmtune_terms.add(("train", "train_total") if model.training else ("eval",), comp, logits.shape[0])
        if return_outputs:
            return comp.loss, {"logits": logits}
        return comp.loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> Any:
        """As ``Trainer.prediction_step``; the reference key column is dropped and the cache bypassed."""
        if self.reference_key_column is not None:
            inputs = _without_keys(inputs, self.reference_key_column)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """As ``Trainer.evaluation_loop``, adding ``<prefix>_nmtune_<term>`` of exactly its own batches."""
        self._nmtune_terms.reset("eval")
        output = super().evaluation_loop(*args, **kwargs)
        params = list(inspect.signature(Trainer.evaluation_loop).parameters)[1:]
        prefix = dict(zip(params, args)).get("metric_key_prefix", kwargs.get("metric_key_prefix", "eval"))
        self._flush("eval", output.metrics, f"{prefix}_nmtune_")
        return output

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """As ``Trainer.train``; the NMTune training logs start from zero."""
        self._nmtune_terms.reset("train")
        self._nmtune_terms.reset("train_total")
        return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the NMTune terms to the Trainer's training logs."""
        if "loss" in logs:
            self._flush("train", logs, "nmtune_")
            self._log_cache(logs)
        if "train_loss" in logs:  # the end of train(): whole-run means, even for runs shorter than logging_steps
            self._nmtune_terms.reset("train")
            self._flush("train_total", logs, "train_nmtune_")
            self._log_cache(logs)
        super().log(logs, *args, **kwargs)
