"""``NMTuneHead``: the MLP ``h`` that reshapes frozen features, plus a classifier.

One class expresses every method the paper compares:

* linear probing: ``NMTuneHead(D, C, mlp=False)`` (``Z = F``) with a plain
  task loss;
* MLP tuning: ``NMTuneHead(D, C)`` with a plain task loss
  (``NMTuneLoss("none")``);
* NMTune: ``NMTuneHead(D, C)`` with ``NMTuneLoss()``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from nmtune._validation import check_bool, check_choice, check_int, check_real

__all__ = ["NMTuneHead", "HeadOutput", "HEAD_PRESETS"]

HEAD_PRESETS: dict[str, dict[str, Any]] = {
    # Section 3.1: a 2-layer MLP with ReLU mapping D -> D -> D, then a linear classifier.
    "paper": dict(mlp=True, hidden_multiplier=1, batch_norm=False, residual=False),
    # The authors' released code: D -> 4D -> BatchNorm -> ReLU -> D, Z = s * MLP(F) + F, and a
    # classifier initialised with kaiming_uniform weights (a = 0) and a zero bias.
    "official": dict(mlp=True, hidden_multiplier=4, batch_norm=True, residual=True, classifier_init="kaiming"),
    # Linear probing: Z = F.
    "linear": dict(mlp=False, hidden_multiplier=1, batch_norm=False, residual=False),
}


class HeadOutput(NamedTuple):
    """What :class:`NMTuneHead` returns.

    Attributes:
        logits: ``(..., num_classes)``.
        features: The tuned features ``Z`` (``(..., in_features)``); equal
            to the input for a linear probe.
    """

    logits: Tensor
    features: Tensor


def _mlp(width: int, hidden: int, batch_norm: bool, dropout: float) -> nn.Sequential:
    """``Linear(D, H) [-> BatchNorm1d] -> ReLU [-> Dropout] -> Linear(H, D)``."""
    layers: list[nn.Module] = [nn.Linear(width, hidden)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU(inplace=True))
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, width))
    return nn.Sequential(*layers)


class NMTuneHead(nn.Module):
    """MLP ``h: F -> Z`` (same width as ``F``) followed by a linear classifier.

    Args:
        in_features: Width ``D`` of the frozen features (and of ``Z``).
        num_classes: Number of output logits.
        hidden_features: Hidden width of the MLP (default ``in_features``,
            the paper's ``D -> D -> D``).
        mlp: ``False`` gives a linear probe (``Z = F``).
        batch_norm: BatchNorm1d after the first layer (the authors' code).
        residual: ``Z = s * MLP(F) + F`` with a learnable per-dimension scale
            ``s`` initialised to one (the authors' code).
        dropout: Dropout probability after the activation.
        classifier_init: ``"default"`` (``nn.Linear``'s) or ``"kaiming"``
            (``kaiming_uniform_`` weights with ``a = 0`` and a zero bias, as the
            authors' ``ClassificationHead``; the ``"official"`` preset's).

    Example:
        >>> head = NMTuneHead(in_features=768, num_classes=100)
        >>> out = head(torch.randn(8, 768))
        >>> out.logits.shape, out.features.shape
        (torch.Size([8, 100]), torch.Size([8, 768]))
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_features: int | None = None,
        *,
        mlp: bool = True,
        batch_norm: bool = False,
        residual: bool = False,
        dropout: float = 0.0,
        classifier_init: str = "default",
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        for name, flag in (("mlp", mlp), ("batch_norm", batch_norm), ("residual", residual)):
            check_bool(name, flag)
        if check_real("dropout", dropout, minimum=0.0) >= 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        if not mlp and (batch_norm or residual or hidden_features is not None or dropout):
            raise ValueError(
                "a linear probe (mlp=False) has no MLP: hidden_features, batch_norm, residual and dropout "
                f"must be left at their defaults; got hidden_features={hidden_features!r}, "
                f"batch_norm={batch_norm!r}, residual={residual!r}, dropout={dropout!r}"
            )
        if hidden_features is not None:
            check_int("hidden_features", hidden_features, minimum=1)
        self.hidden_features = check_int("hidden_features", hidden_features or in_features, minimum=1) if mlp else 0
        self.residual = residual
        self.mlp = _mlp(in_features, self.hidden_features, batch_norm, dropout) if mlp else None
        self.scale = nn.Parameter(torch.ones(in_features)) if residual else None
        self.classifier = nn.Linear(in_features, num_classes)
        if check_choice("classifier_init", classifier_init, ("default", "kaiming")) == "kaiming":
            nn.init.kaiming_uniform_(self.classifier.weight)  # a = 0: bound sqrt(6 / D)
            nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_preset(cls, name: str, in_features: int, num_classes: int, **overrides: Any) -> NMTuneHead:
        """A head from a named preset: ``"paper"``, ``"official"`` or ``"linear"``."""
        check_choice("name", name, tuple(sorted(HEAD_PRESETS)), what="head preset")
        kwargs = dict(HEAD_PRESETS[name])
        kwargs.update(overrides)
        multiplier = kwargs.pop("hidden_multiplier")
        if kwargs["mlp"] and "hidden_features" not in kwargs:
            kwargs["hidden_features"] = multiplier * in_features
        return cls(in_features, num_classes, **kwargs)

    @property
    def is_linear_probe(self) -> bool:
        return self.mlp is None

    def transform(self, features: Tensor) -> Tensor:
        """The tuned features ``Z = h(F)`` (``F`` itself for a linear probe)."""
        if not isinstance(features, Tensor) or not features.is_floating_point():
            got = features.dtype if isinstance(features, Tensor) else type(features).__name__
            raise TypeError(f"features must be a floating-point tensor (..., {self.in_features}); got {got}")
        if features.dim() < 1 or features.shape[-1] != self.in_features:
            raise ValueError(
                f"features must have shape (..., {self.in_features}); got {tuple(features.shape)}"
            )
        param = self.classifier.weight
        if features.dtype != param.dtype or features.device != param.device:
            raise TypeError(f"features are {features.dtype} on {features.device} but the head's parameters are "
                            f"{param.dtype} on {param.device}; cast one to the other (features.to(...) or head.to(...))")
        if self.mlp is None:
            return features
        lead = features.shape[:-1]
        z = self.mlp(features.reshape(-1, self.in_features)).reshape(*lead, self.in_features)
        if self.scale is not None:
            z = self.scale * z + features
        return z

    def forward(self, features: Tensor) -> HeadOutput:
        z = self.transform(features)
        return HeadOutput(self.classifier(z), z)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"hidden_features={self.hidden_features}, residual={self.residual}"
        )
