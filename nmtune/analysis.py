"""Spectral analysis of a feature matrix: singular values, SVE, LSVR, effective rank.

* :func:`feature_spectrum`: singular values (float64, descending) of ``(M, D)`` features;
* :func:`spectrum_summary`: SVE, LSVR, effective rank and the top singular value's share.

Both take ``normalize_rows``: ``False`` (default, as everywhere in nmtune) takes the
spectrum of the features as they are, the one ``L_SVD`` acts on; ``True`` L2-normalises
each row first, the authors' analysis convention, which makes the numbers independent of
each row's scale. The formulas are :mod:`nmtune.functional`'s (``singular_values`` and
``spectrum_metrics``); an all-zero matrix gets their convention (SVE 0, LSVR 0).

The study's report code (record summaries, the paper's claims, figures) lives with the
study (``nmtune_study.report``), not in the library.
"""

from __future__ import annotations

import math

import torch

from nmtune import functional as NF
from nmtune._validation import check_features

__all__ = ["feature_spectrum", "spectrum_summary"]


def feature_spectrum(features: torch.Tensor, *, normalize_rows: bool = False) -> torch.Tensor:
    """Singular values (float64, descending, on the CPU) of a feature matrix ``(M, D)``.

    Args:
        features: Floating-point ``(M, D)`` tensor with ``M >= 2``.
        normalize_rows: L2-normalise rows first (the authors' analysis convention).

    Raises:
        TypeError: ``features`` is not a floating-point tensor.
        ValueError: ``features`` is not a finite matrix with at least 2 rows and 1 column (or is a meta
            tensor, which has no values).

    Example:
        >>> s = feature_spectrum(torch.eye(3))
        >>> [round(v, 3) for v in s.tolist()]
        [1.0, 1.0, 1.0]
    """
    check_features("features", features, min_rows=2, matrix=True, needs_values=True)
    NF.validate_finite(features, "features", hint="")
    return NF.singular_values(features.detach(), normalize_rows=normalize_rows, check_finite=False).double().cpu()


def spectrum_summary(features: torch.Tensor, *, normalize_rows: bool = False) -> dict[str, float]:
    """SVE, LSVR, effective rank and the top singular value share of ``features``.

    ``top1_share`` is ``sigma_1 / sum sigma`` = ``exp(-LSVR)``.

    Example:
        >>> m = spectrum_summary(torch.eye(4))
        >>> round(m["sve"], 4), round(m["lsvr"], 4), round(m["top1_share"], 4)
        (1.3863, 1.3863, 0.25)
    """
    m = NF.spectrum_metrics(feature_spectrum(features, normalize_rows=normalize_rows))
    lsvr = float(m["lsvr"])
    return {"sve": float(m["sve"]), "lsvr": lsvr, "effective_rank": float(m["effective_rank"]),
            "top1_share": math.exp(-lsvr)}
