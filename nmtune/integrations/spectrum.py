"""Watch the feature spectrum while fine-tuning: :class:`SpectrumMonitor` and :class:`SpectrumCallback`.

The paper's diagnosis of pre-training noise is the spectrum of the features: SVE
(singular value entropy), LSVR (largest singular value ratio) and the effective
rank. Both classes embed a fixed probe set every ``every_n_steps`` optimizer steps
and compute those numbers with :func:`nmtune.analysis.spectrum_summary` (of the
features as they are, like ``L_SVD``; ``normalize_rows=True`` for the authors' analysis
convention):

* :class:`SpectrumMonitor` -- plain PyTorch: call :meth:`SpectrumMonitor.step` once
  per optimizer step; it returns the metrics on probe steps and ``None`` otherwise;
* :class:`SpectrumCallback` -- a :class:`SpectrumMonitor` that is also a ``transformers.TrainerCallback`` (so it works with
  ``Trainer``, ``SentenceTransformerTrainer`` and :class:`nmtune.integrations.NMTuneTrainer`)
  that logs the metrics through the trainer's own ``log`` (TensorBoard, W&B, the JSON
  ``log_history``...) as ``spectrum/sve``, ``spectrum/lsvr``, ``spectrum/effective_rank``.

Between probes a step costs one integer comparison: no forward, no host sync. A
probe runs the model in eval mode (each module's mode restored after) without
gradients, and syncs once to read the numbers. ``plot(path)`` (or
``plot_path=...``, written at the end of training) draws the curves to a PNG
(needs matplotlib: ``pip install "nmtune[examples]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor, nn

from nmtune._validation import check_bool, check_int
from nmtune.analysis import spectrum_summary
from nmtune.lora._utils import eval_mode

if TYPE_CHECKING:
    from typing_extensions import Unpack

try:
    from transformers import TrainerCallback as _TrainerCallback
except ModuleNotFoundError:  # pragma: no cover - exercised only without the extra
    _TrainerCallback = object  # SpectrumMonitor works without transformers; SpectrumCallback says what is missing

__all__ = ["SpectrumMonitor", "SpectrumCallback", "METRICS", "probe_features"]

METRICS = ("sve", "lsvr", "effective_rank")
"""The spectrum metrics logged at each probe (from :func:`nmtune.analysis.spectrum_summary`)."""

FeaturesFn = Callable[[nn.Module, Any], Tensor]
LogFn = Callable[[dict[str, float], int], Any]


class _MonitorOptions(TypedDict, total=False):
    """The keyword options of :class:`SpectrumMonitor`, which :class:`SpectrumCallback` takes too."""

    features_fn: FeaturesFn | None
    normalize_rows: bool
    log_fn: LogFn | None


def _get(output: Any, key: str) -> Any:
    return output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)


def _masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def probe_features(model: nn.Module, probe: Any) -> Tensor:
    """The default features of ``probe`` for ``model``, ``(M, D)``.

    * a list of strings and a model with ``encode`` (a ``SentenceTransformer``): its sentence embeddings;
    * a tensor: ``model(probe)`` (a tensor, or an output with ``features``);
    * a dict of tensors (a tokenized batch): ``model(**probe)``, then the first of its ``features``
      (e.g. :func:`nmtune.wrap_lora`'s), ``sentence_embedding``, ``pooler_output``, or
      ``last_hidden_state`` / the last of ``hidden_states`` mean-pooled over ``attention_mask``.

    Raises:
        TypeError: A probe or an output of another kind (pass ``features_fn``).
    """
    if isinstance(probe, (list, tuple)) and probe and all(isinstance(t, str) for t in probe):
        if not hasattr(model, "encode"):
            raise TypeError(f"a probe of texts needs a model with .encode (a SentenceTransformer); got "
                            f"{type(model).__name__}: pass features_fn=(model, probe) -> features")
        return model.encode(list(probe), convert_to_tensor=True, show_progress_bar=False)  # type: ignore[operator]
    device = _device_of(model)
    if isinstance(probe, Tensor):
        output = model(probe.to(device))
        features = output if isinstance(output, Tensor) else _get(output, "features")
    elif isinstance(probe, Mapping):
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in probe.items()}
        output = model(**inputs)
        features = None
        for key in ("features", "sentence_embedding", "pooler_output"):
            if isinstance(_get(output, key), Tensor):
                features = _get(output, key)
                break
        if features is None:
            hidden = _get(output, "last_hidden_state")
            states = _get(output, "hidden_states")
            if not isinstance(hidden, Tensor) and isinstance(states, (list, tuple)) and states:
                hidden = states[-1]
            if isinstance(hidden, Tensor) and hidden.dim() == 3:
                features = _masked_mean(hidden, inputs.get("attention_mask"))
    else:
        raise TypeError(f"probe must be a list of texts, a tensor or a dict of tensors; got {type(probe).__name__} "
                        "(or pass features_fn=(model, probe) -> features)")
    if not isinstance(features, Tensor):
        raise TypeError(
            f"{type(model).__name__}'s output on the probe has no features (tried features, sentence_embedding, "
            "pooler_output, last_hidden_state, hidden_states); pass features_fn=(model, probe) -> (M, D) features, "
            "or for a classification model call it with output_hidden_states=True in the probe dict"
        )
    return features


class SpectrumMonitor:
    """SVE, LSVR and effective rank of a model's features on a fixed probe set, every N steps.

    Args:
        probe: The probe inputs: texts (for a ``SentenceTransformer``), a tensor, or a tokenized
            dict; embedded by ``features_fn``. Keep it fixed and at least a few hundred rows for
            stable numbers (the rank is at most ``min(rows, dim)``).
        every_n_steps: Probe every this many calls of :meth:`step` (and on the first, step 0).
        features_fn: ``(model, probe) -> (M, D)`` features; default :func:`probe_features`.
        normalize_rows: L2-normalise rows before the spectrum (the authors' analysis convention;
            default ``False``: the features as the regularizer sees them).
        log_fn: Called with ``(metrics, step)`` after each probe, e.g. a TensorBoard writer's
            ``add_scalars``-like function or ``print``.

    Attributes:
        history: One dict per probe: ``{"step": s, "sve": ..., "lsvr": ..., "effective_rank": ...}``.

    Example:
        >>> net = nn.Linear(8, 16)
        >>> monitor = SpectrumMonitor(torch.randn(32, 8), every_n_steps=2)
        >>> [monitor.step(net) is not None for _ in range(4)]
        [True, False, True, False]
        >>> [h["step"] for h in monitor.history], sorted(monitor.history[0])
        ([0, 2], ['effective_rank', 'lsvr', 'step', 'sve'])
    """

    def __init__(
        self,
        probe: Any,
        every_n_steps: int = 100,
        *,
        features_fn: FeaturesFn | None = None,
        normalize_rows: bool = False,
        log_fn: LogFn | None = None,
    ) -> None:
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.normalize_rows = check_bool("normalize_rows", normalize_rows)
        for name, fn in (("features_fn", features_fn), ("log_fn", log_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None; got {type(fn).__name__}")
        if probe is None or (isinstance(probe, (Sequence, Mapping)) and not isinstance(probe, str) and not probe):
            raise ValueError(f"probe must be a non-empty set of inputs; got {probe!r}")
        self.probe = probe
        self.features_fn: FeaturesFn = features_fn if features_fn is not None else probe_features
        self.log_fn = log_fn
        self.history: list[dict[str, float]] = []
        self._calls = 0

    def due(self, step: int) -> bool:
        """Whether ``step`` is a probe step (a multiple of ``every_n_steps``)."""
        return step % self.every_n_steps == 0

    def step(self, model: nn.Module) -> dict[str, float] | None:
        """Count one optimizer step; on probe steps measure ``model`` and return the metrics."""
        step, self._calls = self._calls, self._calls + 1
        return self.measure(model, step) if self.due(step) else None

    @torch.no_grad()
    def measure(self, model: nn.Module, step: int) -> dict[str, float]:
        """Embed the probe with ``model`` (eval mode, no gradients) and record its spectrum at ``step``."""
        with eval_mode(model):
            features = self.features_fn(model, self.probe)
        if not isinstance(features, Tensor) or features.dim() != 2:
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features_fn must return (M, D) features; got {got}")
        summary = spectrum_summary(features.float(), normalize_rows=self.normalize_rows)  # the one host sync
        metrics = {name: summary[name] for name in METRICS}
        self.history.append({"step": step, **metrics})
        if self.log_fn is not None:
            self.log_fn(metrics, step)
        return metrics

    def plot(self, path: str | os.PathLike) -> str:
        """Write the curves of :attr:`history` (one panel per metric) to a PNG; returns the path.

        Raises:
            ModuleNotFoundError: matplotlib is missing (``pip install "nmtune[examples]"``).
            ValueError: Nothing was measured yet.
        """
        if not self.history:
            raise ValueError("no probe has run yet: nothing to plot")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError('SpectrumMonitor.plot needs matplotlib: pip install "nmtune[examples]"') from err
        steps = [h["step"] for h in self.history]
        fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3), constrained_layout=True)
        for ax, name in zip(axes, METRICS):
            ax.plot(steps, [h[name] for h in self.history], marker="o")
            ax.set_xlabel("step")
            ax.set_title(name.replace("_", " "))
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class SpectrumCallback(SpectrumMonitor, _TrainerCallback):  # type: ignore[misc,valid-type]
    """A :class:`SpectrumMonitor` that is a ``transformers.TrainerCallback``: it logs the feature
    spectrum every N optimizer steps through the trainer.

    At the start of training (step 0) and at every ``global_step`` that is a multiple of
    ``every_n_steps`` it embeds the probe with the trainer's model (:meth:`measure`)
    and calls ``trainer.log({"spectrum/sve": ..., "spectrum/lsvr": ...,
    "spectrum/effective_rank": ...})``, so every reporter the trainer has (TensorBoard, W&B,
    ``state.log_history``) records them at that step. A callback cannot reach its trainer by
    itself: register it with :meth:`attach` (or pass ``trainer=``).

    Args:
        probe: As for :class:`SpectrumMonitor`.
        every_n_steps: Probe every this many optimizer steps.
        plot_path: Write the curves to this PNG at the end of training (``None``: no plot).
        prefix: Prefix of the logged names (default ``"spectrum/"``).
        trainer: The trainer to log through (or call :meth:`attach` later).
        **options: ``features_fn``, ``normalize_rows`` and ``log_fn``, as for :class:`SpectrumMonitor`.

    Example:
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
        >>> SpectrumCallback(probe, every_n_steps=50).attach(trainer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        probe: Any,
        every_n_steps: int = 100,
        *,
        plot_path: str | os.PathLike | None = None,
        prefix: str = "spectrum/",
        trainer: Any = None,
        **options: Unpack[_MonitorOptions],
    ) -> None:
        if _TrainerCallback is object:  # pragma: no cover - exercised only without the extra
            raise ModuleNotFoundError('SpectrumCallback needs the "transformers" package: pip install "nmtune[lora]"')
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str; got {type(prefix).__name__}")
        if plot_path is not None and not isinstance(plot_path, (str, os.PathLike)):
            raise TypeError(f"plot_path must be a path or None; got {type(plot_path).__name__}")
        super().__init__(probe, every_n_steps, **options)
        self.plot_path = plot_path
        self.prefix = prefix
        self.trainer = trainer

    def attach(self, trainer: Any) -> SpectrumCallback:
        """Log through ``trainer`` and add this callback to it; returns ``self``."""
        if not callable(getattr(trainer, "log", None)) or not callable(getattr(trainer, "add_callback", None)):
            raise TypeError(f"trainer must be a transformers Trainer; got {type(trainer).__name__}")
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def _probe(self, model: nn.Module | None, step: int) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "SpectrumCallback has no trainer to log through: register it with "
                "SpectrumCallback(...).attach(trainer) (or pass trainer=...) instead of callbacks=[...]"
            )
        if model is None:
            model = self.trainer.model
        metrics = self.measure(model, step)
        self.trainer.log({f"{self.prefix}{name}": round(value, 6) for name, value in metrics.items()})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._probe(model, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        if self.due(state.global_step):  # the only work between probes
            self._probe(model, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.plot_path is not None and state.is_world_process_zero and self.history:
            self.plot(self.plot_path)
