"""``NMTuneConfig``: the validated settings of the NMTune regularizers, and its presets.

Each term has one name everywhere: ``consistency`` (``L_MSE``), ``covariance``
(``L_COV``) and ``singular_value`` (``L_SVD``) name the config weights
(``<term>_weight``), the fields of :class:`~nmtune.LossComponents`, the
functions of :mod:`nmtune.functional` (``<term>_loss``) and the logged keys.
The 0.1 names (``mse_weight``, ``cov_weight``, ``svd_weight``, ``consistency``
for the reduction mode) still work, with a ``DeprecationWarning``, until 0.3.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from nmtune._deprecation import RenamedAttribute, renamed_keywords
from nmtune._validation import check_bool, check_choice, check_int, check_real
from nmtune.distributed import STATISTICS_PATHS

__all__ = ["NMTuneConfig", "PRESETS", "SMALL_BATCH_POLICIES", "RENAMED_FIELDS"]

PRESETS: dict[str, dict[str, Any]] = {
    # Section 3.1 of the paper: L = L_CE + 0.01 (L_MSE + L_COV + L_SVD).
    "paper": dict(
        lambda_=0.01, consistency_weight=1.0, covariance_weight=1.0, singular_value_weight=1.0, top_k=1,
        consistency_mode="sample",
    ),
    # The authors' released training script: 1.0 MSE + 0.04 COV + 0.001 SVD, no lambda,
    # element-mean MSE of normalised rows, mean of the top-5 normalised singular values.
    # With fewer than 5 singular values (batches of <= 4 rows) the mean runs over those that exist.
    "official": dict(
        lambda_=1.0, consistency_weight=1.0, covariance_weight=0.04, singular_value_weight=0.001, top_k=5,
        consistency_mode="element", clamp_top_k=True,
    ),
    # No regularization: the plain task loss (linear probing and MLP tuning baselines).
    "none": dict(
        lambda_=0.0, consistency_weight=0.0, covariance_weight=0.0, singular_value_weight=0.0, top_k=1,
        consistency_mode="sample",
    ),
}

SMALL_BATCH_POLICIES = ("error", "skip")
#: The values of ``consistency_mode``: the paper's per-sample distance, or the authors' element mean.
CONSISTENCY_MODES = ("sample", "element")
#: The values of ``precision``: the dtype of the Gram product and the spectrum.
PRECISIONS = ("float32", "float64")

#: The 0.1 field names and the names that replace them (accepted with a warning until 0.3).
RENAMED_FIELDS = {
    "mse_weight": "consistency_weight",
    "cov_weight": "covariance_weight",
    "svd_weight": "singular_value_weight",
    "consistency": "consistency_mode",
}


def _new_names(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with every 0.1 name replaced by its new one (a ``DeprecationWarning`` each, pointing at
    the caller of the ``NMTuneConfig`` method that received them)."""
    return renamed_keywords("NMTuneConfig", fields, RENAMED_FIELDS, stacklevel=3)


@dataclass(frozen=True)
class NMTuneConfig:
    """Validated configuration of the NMTune regularizers.

    Attributes:
        lambda_: Overall weight of the regularizers (``0.01`` in the paper).
        consistency_weight: Weight of the consistency term ``L_MSE``.
        covariance_weight: Weight of the covariance term ``L_COV``.
        singular_value_weight: Weight of the dominant singular value term ``L_SVD``.
        top_k: Leading singular values in ``L_SVD`` (1 in the paper, 5 in the authors' code).
        consistency_mode: ``"sample"`` (per-sample squared distance, the paper)
            or ``"element"`` (element mean, the authors' code).
        precision: Spectrum/Gram precision, ``"float64"`` (default) or ``"float32"`` (fast).
        check_finite: Raise ``ValueError`` on NaN/Inf features (one host sync per call).
        gather_distributed: ``L_COV`` and ``L_SVD`` on the global batch gathered
            from every rank (autograd-aware); ``L_MSE`` stays local.
        equal_local_batches: With ``gather_distributed``, promise equal local
            batch sizes (``drop_last=True``) to skip the per-step shape exchange
            and its host sync; a broken promise fails inside the collective
            (gloo) or hangs (NCCL). See docs/distributed.md.
        distributed_statistics: With ``gather_distributed``, how the global
            statistics are formed: ``"gather"`` all-gathers the rows
            (``M_global x D``), ``"reduce"`` all-reduces the global mean and
            the ``D x D`` scatter about it, ``"auto"`` (default) takes
            ``"reduce"`` when the global batch has more rows than ``D`` and
            ``"gather"`` otherwise. Both are exact; see docs/distributed.md.
        small_batch: A batch of fewer than 2 rows (globally, under a gather):
            ``"error"`` (default) or ``"skip"`` (the regularizer is a zero that
            keeps ``z`` in the graph; ``LossComponents.skipped`` is 1; decided
            from shapes, no host sync). ``fit``, ``NMTuneTrainer`` and
            ``wrap_lora`` models use ``"skip"``.
        clamp_top_k: With fewer than ``top_k`` singular values, average those
            that exist instead of raising (``"official"``, as the authors'
            ``torch.mean(s[:5])``).

    Example:
        >>> cfg = NMTuneConfig.from_preset("official", top_k=3)
        >>> NMTuneConfig.from_json(cfg.to_json()) == cfg
        True
    """

    lambda_: float = 0.01
    consistency_weight: float = 1.0
    covariance_weight: float = 1.0
    singular_value_weight: float = 1.0
    top_k: int = 1
    consistency_mode: str = "sample"
    precision: str = "float64"
    check_finite: bool = True
    gather_distributed: bool = False
    equal_local_batches: bool = False
    distributed_statistics: str = "auto"
    small_batch: str = "error"
    clamp_top_k: bool = False

    mse_weight = RenamedAttribute("consistency_weight")
    cov_weight = RenamedAttribute("covariance_weight")
    svd_weight = RenamedAttribute("singular_value_weight")
    consistency = RenamedAttribute("consistency_mode")
    uses_spectrum = RenamedAttribute("uses_singular_value")

    def __post_init__(self) -> None:
        for name in ("lambda_", "consistency_weight", "covariance_weight", "singular_value_weight"):
            object.__setattr__(self, name, check_real(name, getattr(self, name), minimum=0.0))
        check_int("top_k", self.top_k, minimum=1)
        check_choice("consistency_mode", self.consistency_mode, CONSISTENCY_MODES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("small_batch", self.small_batch, SMALL_BATCH_POLICIES)
        check_choice("distributed_statistics", self.distributed_statistics, STATISTICS_PATHS)
        for name in ("check_finite", "gather_distributed", "equal_local_batches", "clamp_top_k"):
            check_bool(name, getattr(self, name))

    @classmethod
    def from_preset(cls, name: str = "paper", **overrides: Any) -> NMTuneConfig:
        """A named preset (``"paper"``, ``"official"``, ``"none"``) with overrides."""
        check_choice("name", name, tuple(sorted(PRESETS)), what="preset")
        return cls(**{**PRESETS[name], **_new_names(overrides)})

    def replace(self, **changes: Any) -> NMTuneConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **_new_names(changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NMTuneConfig:
        """From :meth:`to_dict`'s output (0.1 files with the old field names load too)."""
        known = {f.name for f in dataclasses.fields(cls)} | set(RENAMED_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NMTuneConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**_new_names(data))

    @classmethod
    def from_json(cls, text: str) -> NMTuneConfig:
        return cls.from_dict(json.loads(text))

    @property
    def uses_consistency(self) -> bool:
        return self.lambda_ > 0 and self.consistency_weight > 0

    @property
    def uses_covariance(self) -> bool:
        return self.lambda_ > 0 and self.covariance_weight > 0

    @property
    def uses_singular_value(self) -> bool:
        return self.lambda_ > 0 and self.singular_value_weight > 0


def _accept_renamed_keywords(init: Any) -> Any:
    """The dataclass ``__init__``, taking the 0.1 keyword names too (with a warning)."""

    @functools.wraps(init)
    def __init__(self: NMTuneConfig, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **_new_names(kwargs))

    return __init__


NMTuneConfig.__init__ = _accept_renamed_keywords(NMTuneConfig.__init__)  # type: ignore[method-assign]


def resolve_config(config: NMTuneConfig | str | None, overrides: dict[str, Any], name: str = "config") -> NMTuneConfig:
    """``config`` (an :class:`NMTuneConfig`, a preset name, or ``None`` for ``"paper"``) with ``overrides``."""
    if config is None:
        config = "paper"
    if isinstance(config, str):
        check_choice(name, config, tuple(sorted(PRESETS)), what="preset")
        return NMTuneConfig.from_preset(config, **overrides)
    if isinstance(config, NMTuneConfig):
        return config.replace(**overrides) if overrides else config
    raise TypeError(f"{name} must be an NMTuneConfig, a preset name or None; got {type(config).__name__}")
