"""NMTune for sentence-transformers: :class:`NMTuneSentenceLoss` and :class:`NMTuneDataCollator`.

:class:`NMTuneSentenceLoss` wraps any sentence-transformers loss that embeds its
input columns with the model it was built with (``MultipleNegativesRankingLoss``,
``CoSENTLoss``, ``SoftmaxLoss``, ``TripletLoss``, ``MatryoshkaLoss``...) and adds
the NMTune regularizers to it:

* ``Z``: every sentence embedding the wrapped loss computes in the step, all input
  columns concatenated in column order, observed in that loss's own forward by two
  hooks (inputs of the model's first module, ``sentence_embedding`` of its last):
  no second forward of the tuned model;
* ``F``: the embeddings of the same inputs by the model as it was when the loss was
  built, frozen and in eval mode (dropout off): the same weights with the adapter
  disabled when the model carries a PEFT adapter (``model.add_adapter``), otherwise
  a frozen copy made at construction (its parameters again in memory: 86.7 MiB for
  all-MiniLM-L6-v2, see docs/sentence_transformers.md for the measured time);
  with a :class:`nmtune.ReferenceCache` and :class:`NMTuneDataCollator` (a key
  column in the dataset) ``F`` is computed once per text and read back afterwards.

The loss returns a dict, which ``SentenceTransformerTrainer`` (and ``model.fit``,
which runs it) sums into the training loss and logs entry by entry next to
``loss``: ``base_loss`` and the weighted contribution ``lambda_ * weight * term`` of
each enabled NMTune term (``nmtune_consistency``, ``nmtune_covariance``,
``nmtune_singular_value``), so the logged parts add up to the logged loss. The raw
terms, SVE and LSVR of the last step are in :attr:`NMTuneSentenceLoss.last_components`.
``pip install "nmtune[sentence-transformers]"``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

try:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError(
        'NMTuneSentenceLoss needs the "sentence-transformers" package: pip install "nmtune[sentence-transformers]"'
    ) from err

from nmtune.config import NMTuneConfig, resolve_config
from nmtune._validation import check_choice
from nmtune.lora._utils import eval_mode, unwrap_model
from nmtune.loss import LossComponents, NMTuneRegularizer
from nmtune.reference_cache import ReferenceCache

__all__ = ["NMTuneSentenceLoss", "NMTuneDataCollator", "REFERENCE_SOURCES", "TERMS", "KEY_FEATURE"]

REFERENCE_SOURCES = ("auto", "adapter", "copy")
"""Where ``F`` comes from: ``"adapter"`` (the model with its PEFT adapter disabled), ``"copy"`` (a frozen
copy made when the loss is built) or ``"auto"`` (``"adapter"`` when the model carries one, else ``"copy"``)."""

TERMS = ("consistency", "covariance", "singular_value")
"""NMTune terms whose weighted contributions the loss returns as ``nmtune_<term>``."""

KEY_FEATURE = "nmtune_key"
"""The per-column feature :class:`NMTuneDataCollator` adds: the example's key from the dataset's key column."""

# The suffixes by which SentenceTransformerTrainer.collect_features recognises an input column.
_FEATURE_SUFFIXES = ("input_ids", "sentence_embedding", "pixel_values", "input_features", "input_values",
                     "pixel_values_videos")


def _adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT adapter layers in ``model`` (``model.add_adapter`` or ``peft.inject_adapter_in_model``)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ModuleNotFoundError:
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def _adapters_disabled(layers: list[nn.Module]) -> Iterator[None]:
    """Every adapter layer disabled inside the block; each one's state and ``requires_grad`` restored after."""
    merged = [type(m).__name__ for m in layers if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"{len(merged)} adapter layer(s) are merged into the base weights, so disabling them "
                         "does not give the model the loss was built with; unmerge them before training")
    disabled = [bool(getattr(m, "disable_adapters", False)) for m in layers]
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, disabled):
            m.enable_adapters(not was_disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


@dataclass
class _Observed:
    """What the hooks saw in one call of the wrapped loss: each real forward's inputs and embedding."""

    inputs: list[dict[str, Any]]
    embeddings: list[Tensor]


@contextmanager
def _observe(model: nn.Module) -> Iterator[_Observed]:
    """Record the inputs of ``model``'s first module and the ``sentence_embedding`` its last module returns.

    Hooks on the first and last modules (not on the model) see each real forward exactly once, even
    under ``MatryoshkaLoss``, which replaces the model's ``forward`` by a cache of the full embeddings.
    """
    modules = list(model.children())
    if not modules:
        raise TypeError(f"NMTuneSentenceLoss needs a SentenceTransformer (a sequence of modules); got "
                        f"{type(model).__name__} with no submodules")
    seen = _Observed([], [])

    def before(_module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], dict):
            seen.inputs.append(dict(args[0]))  # the modules update this dict in place: keep the inputs

    def after(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        embedding = output.get("sentence_embedding") if isinstance(output, dict) else None
        if isinstance(embedding, Tensor):
            seen.embeddings.append(embedding)

    handles = [modules[0].register_forward_pre_hook(before), modules[-1].register_forward_hook(after)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class NMTuneSentenceLoss(nn.Module):
    """A sentence-transformers loss plus the NMTune regularizers on the embeddings it computes.

    ``forward(features, labels)`` returns ``{"base_loss": L, "nmtune_<term>": lambda_ * w * L_term, ...}``
    (one entry per enabled term; a wrapped loss that returns a dict keeps its own entries instead of
    ``base_loss``). ``SentenceTransformerTrainer`` sums the entries into the loss and logs each one.
    ``Z`` is every sentence embedding the wrapped loss computed (columns concatenated in column
    order), ``F`` the embeddings of the same inputs by the model as it was when this loss was built.
    The config runs with ``small_batch="skip"``: a batch of one row trains on the base loss alone.

    Args:
        model: The ``SentenceTransformer`` being trained (the one ``loss`` was built with).
        loss: A sentence-transformers loss built on ``model``.
        config: ``NMTuneConfig`` or preset name (default ``"paper"``).
        reference: ``"auto"`` (default), ``"adapter"`` or ``"copy"``; see :data:`REFERENCE_SOURCES`.
        reference_cache: A :class:`nmtune.ReferenceCache` with ``num_examples = len(dataset) *
            number of text columns`` (a row per text), used in training when the batches carry keys
            (:class:`NMTuneDataCollator`); only with ``reference="copy"``.
        **overrides: Fields of :class:`NMTuneConfig` to change.

    Raises:
        TypeError: ``model`` is not a ``SentenceTransformer`` or ``loss`` not an ``nn.Module``.
        ValueError: ``loss`` was not built on ``model``, ``reference="adapter"`` for a model without
            an adapter, or a cache without ``reference="copy"``.

    Example:
        >>> from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        >>> loss = NMTuneSentenceLoss(model, MultipleNegativesRankingLoss(model))  # doctest: +SKIP
        >>> SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: SentenceTransformer,
        loss: nn.Module,
        config: NMTuneConfig | str | None = "paper",
        *,
        reference: str = "auto",
        reference_cache: ReferenceCache | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, SentenceTransformer):
            raise TypeError(f"model must be a sentence_transformers.SentenceTransformer; got {type(model).__name__}")
        if not isinstance(loss, nn.Module):
            raise TypeError(f"loss must be a sentence-transformers loss (an nn.Module); got {type(loss).__name__}")
        built_on = getattr(loss, "model", None)
        if not isinstance(built_on, nn.Module) or unwrap_model(built_on) is not model:
            raise ValueError(
                f"{type(loss).__name__} was not built on this model (its `.model` is "
                f"{type(built_on).__name__}); NMTuneSentenceLoss observes the embeddings the "
                "loss computes with `model`, so build the loss as LossClass(model, ...)"
            )
        check_choice("reference", reference, REFERENCE_SOURCES)
        if reference == "auto":
            reference = "adapter" if _adapter_layers(model) else "copy"
        if reference == "adapter" and not _adapter_layers(model):
            raise ValueError('reference="adapter" needs a model with a PEFT adapter (model.add_adapter(config))')
        if reference_cache is not None and not isinstance(reference_cache, ReferenceCache):
            raise TypeError(f"reference_cache must be an nmtune.ReferenceCache or None; got "
                            f"{type(reference_cache).__name__}")
        if reference_cache is not None and reference != "copy":
            raise ValueError('reference_cache works with reference="copy" (a frozen reference model to fingerprint); '
                             f"got reference={reference!r}")
        self.model = model
        self.loss = loss
        self.regularizer = NMTuneRegularizer(resolve_config(config, overrides).replace(small_batch="skip"))
        self.reference = reference
        self.reference_model: nn.Module | None = None
        if reference == "copy":
            self.reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        self.reference_cache = reference_cache
        if reference_cache is not None:
            reference_cache.check_model(self.reference_model)  # type: ignore[arg-type]
        self.last_components: LossComponents | None = None

    @property
    def config(self) -> NMTuneConfig:
        """The regularizers' config (with ``small_batch="skip"``)."""
        return self.regularizer.config

    def train(self, mode: bool = True) -> NMTuneSentenceLoss:
        """As ``nn.Module.train``; the frozen reference copy stays in eval mode."""
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    # -- the step ------------------------------------------------------------------------------
    def forward(self, sentence_features: Iterable[dict[str, Any]], labels: Tensor | None) -> dict[str, Tensor]:
        """The wrapped loss's value(s) and the weighted NMTune terms, by name (they add up to the loss)."""
        features = [dict(f) for f in sentence_features]
        keys = [f.pop(KEY_FEATURE, None) for f in features]
        model = unwrap_model(self.model)
        with _observe(model) as seen:
            base = self.loss(features, labels)
        z = self._embeddings(seen, model)
        f = self._reference_features(model, seen.inputs, keys, z) if self.config.uses_consistency else None
        comp = self.regularizer(z, f, return_components=True)
        self.last_components = comp
        out = dict(base) if isinstance(base, dict) else {"base_loss": base}
        return {**out, **self._weighted_terms(comp)}

    def _weighted_terms(self, comp: LossComponents) -> dict[str, Tensor]:
        """``nmtune_<term>``: ``lambda_ * w_t * L_t`` per enabled term, adding up to ``comp.loss``.

        The gradient of the whole regularizer flows through the first entry (``comp.loss`` minus the
        detached values of the others), so the entries sum to the regularizer in value and gradient.
        """
        cfg = self.config
        weights = {"consistency": cfg.consistency_weight, "covariance": cfg.covariance_weight,
                   "singular_value": cfg.singular_value_weight}
        enabled = [t for t in TERMS if weights[t] > 0] if cfg.lambda_ > 0 else []
        if not enabled:
            return {}
        parts = {t: cfg.lambda_ * weights[t] * getattr(comp, t) for t in enabled[1:]}
        first = comp.loss - sum(parts.values()) if parts else comp.loss
        return {f"nmtune_{enabled[0]}": first, **{f"nmtune_{t}": v for t, v in parts.items()}}

    # -- observation ---------------------------------------------------------------------------
    def _embeddings(self, seen: _Observed, model: nn.Module) -> Tensor:
        """``Z``: the observed embeddings in call order (= column order), checked."""
        name = type(self.loss).__name__
        if not seen.embeddings:
            raise ValueError(
                f"{name} computed no sentence embedding with the model in its forward, so NMTuneSentenceLoss "
                "has nothing to regularize; it wraps losses that embed their input columns with the model they "
                "were built with (MultipleNegativesRankingLoss, CoSENTLoss, SoftmaxLoss, ...)"
            )
        if len(seen.inputs) != len(seen.embeddings):
            raise ValueError(
                f"{name}: the model's first module ran {len(seen.inputs)} time(s) but its last returned "
                f"{len(seen.embeddings)} sentence embedding(s); NMTuneSentenceLoss cannot pair inputs with embeddings"
            )
        if torch.is_grad_enabled() and model.training and not all(e.requires_grad for e in seen.embeddings):
            raise ValueError(
                f"{name} computes its embeddings without gradients (as the gradient-caching Cached* losses do), so "
                "regularizers on them cannot train the model; wrap the loss's non-cached variant (e.g. "
                "MultipleNegativesRankingLoss for CachedMultipleNegativesRankingLoss)"
            )
        widths = {tuple(e.shape[1:]) for e in seen.embeddings}
        if len(widths) != 1 or any(e.dim() != 2 for e in seen.embeddings):
            shapes = [tuple(e.shape) for e in seen.embeddings]
            raise ValueError(f"{name}: the sentence embeddings must be (rows, dim) of one width; got {shapes}")
        return torch.cat(seen.embeddings) if len(seen.embeddings) > 1 else seen.embeddings[0]

    # -- the reference F -----------------------------------------------------------------------
    def _reference_features(self, model: nn.Module, inputs: list[dict[str, Any]], keys: list[Any],
                            z: Tensor) -> Tensor:
        """``F`` of every observed input, in ``Z``'s row order, without gradients."""
        row_keys = self._row_keys(keys, z) if self.reference_cache is not None and model.training else None
        if row_keys is not None:
            cached = self.reference_cache.lookup(row_keys)  # type: ignore[union-attr]
            if cached is not None:
                return cached.to(device=z.device, dtype=z.dtype)
        f = self._compute_reference(model, inputs).to(z.dtype)
        if row_keys is not None:
            self.reference_cache.store(row_keys, f)  # type: ignore[union-attr]
        return f

    @torch.no_grad()
    def _compute_reference(self, model: nn.Module, inputs: list[dict[str, Any]]) -> Tensor:
        if self.reference == "adapter":
            with eval_mode(model), _adapters_disabled(_adapter_layers(model)):
                rows = [model(dict(x))["sentence_embedding"] for x in inputs]
        else:
            ref = cast(nn.Module, self.reference_model)
            device = next((v.device for v in inputs[0].values() if isinstance(v, Tensor)), None)
            if device is not None and next(ref.parameters()).device != device:
                ref.to(device)  # once: a loss built before the model moved
            rows = [ref(dict(x))["sentence_embedding"] for x in inputs]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def _row_keys(self, keys: list[Any], z: Tensor) -> Tensor | None:
        """A cache key per row of ``Z``: ``key * columns + column``; ``None`` when the batch carries no keys."""
        if all(k is None for k in keys):
            return None
        if any(k is None for k in keys):
            raise ValueError(f"only some columns carry {KEY_FEATURE!r}; use NMTuneDataCollator for the whole batch")
        columns = len(keys)
        rows = torch.cat([torch.as_tensor(k, device=z.device).long() * columns + c for c, k in enumerate(keys)])
        if rows.shape[0] != z.shape[0]:
            raise ValueError(
                f"{type(self.loss).__name__} embedded {z.shape[0]} rows but the batch has {rows.shape[0]} keyed texts; "
                "the reference cache needs one embedding per text"
            )
        return rows

    # -- sentence-transformers' model card --------------------------------------------------------
    def get_config_dict(self) -> dict[str, Any]:
        """The wrapped loss's config and the NMTune config (for the model card)."""
        inner = self.loss.get_config_dict() if hasattr(self.loss, "get_config_dict") else {}
        return {"loss": type(self.loss).__name__, **inner, "nmtune": self.config.to_dict(),
                "reference": self.reference}

    @property
    def citation(self) -> str:
        """BibTeX of the NMTune paper (the wrapped loss's own is listed by the model card too)."""
        return (
            "@inproceedings{chen2024understanding,\n"
            "    title={Understanding and Mitigating the Label Noise in Pre-training on Downstream Tasks},\n"
            "    author={Chen, Hao and Wang, Jindong and Shah, Ankit and Tao, Ran and Wei, Hongxin and Xie, Xing "
            "and Sugiyama, Masashi and Raj, Bhiksha},\n"
            "    booktitle={International Conference on Learning Representations},\n"
            "    year={2024}\n"
            "}"
        )


@dataclass
class NMTuneDataCollator(SentenceTransformerDataCollator):
    """sentence-transformers' collator that passes a key column to :class:`NMTuneSentenceLoss`.

    The key column (integer example indices ``0 <= key < len(dataset)``) is not tokenized: its
    values travel with every text column as the feature :data:`KEY_FEATURE`, which the loss removes
    before the wrapped loss sees the batch and uses as the :class:`nmtune.ReferenceCache` key.

    It is built as ``SentenceTransformerDataCollator`` is (``model.preprocess`` first, then that
    collator's keyword fields), plus:

    Attributes:
        key_column: The dataset's key column (default ``"idx"``).

    Example:
        >>> collator = NMTuneDataCollator(model.preprocess, key_column="idx")  # doctest: +SKIP
    """

    key_column: str = "idx"

    def __post_init__(self) -> None:
        if not isinstance(self.key_column, str) or not self.key_column:
            raise TypeError(f"key_column must be a non-empty str naming the dataset's key column; "
                            f"got {type(self.key_column).__name__} {self.key_column!r}")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            return {}
        if self.key_column not in features[0]:
            raise ValueError(f"NMTuneDataCollator(key_column={self.key_column!r}) but the dataset has no such "
                             f"column; got columns {sorted(features[0])}")
        keys = torch.tensor([row[self.key_column] for row in features], dtype=torch.long)
        batch = super().__call__([{k: v for k, v in row.items() if k != self.key_column} for row in features])
        prefixes = {name[: -len(suffix)] for name in batch for suffix in _FEATURE_SUFFIXES
                    if name.endswith("_" + suffix)}
        for prefix in prefixes:
            batch[prefix + KEY_FEATURE] = keys
        return batch
