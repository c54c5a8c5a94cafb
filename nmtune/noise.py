"""Label-noise injection for noisy pre-training studies.

Every function is seeded (an ``int`` seed or a ``torch.Generator``), corrupts an
exact number of samples, and returns the new labels together with the boolean mask
of the corrupted indices, so that the clean/noisy split can be logged or audited.

* :func:`symmetric_noise` flips ``round(ratio * N)`` labels, each to a class drawn
  uniformly among the *other* classes (the paper's ImageNet-1K protocol).
* :func:`asymmetric_noise` does the same inside a class subset only (the paper's
  noise on the ImageNet classes that overlap CIFAR-100).
* :func:`pair_flip_noise` flips class ``c`` to ``mapping[c]`` (class-pair flips).
* :func:`swap_pairs` swaps the captions of ``round(ratio * N)`` image-text pairs among
  themselves so that none keeps its own caption (noisy contrastive data).

Counts use Python's ``round`` (half to even).
"""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from nmtune._validation import check_int, check_real, check_tensor

__all__ = ["NoisyLabels", "symmetric_noise", "asymmetric_noise", "pair_flip_noise", "swap_pairs"]


class NoisyLabels(NamedTuple):
    """Result of a noise injection.

    Attributes:
        labels: the new labels (``int64`` tensor, same length as the input).
        mask: ``True`` where the label was corrupted.
    """

    labels: torch.Tensor
    mask: torch.Tensor


def _as_labels(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        check_tensor("labels", labels, kind="any", needs_values=True)
        t = labels.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(labels))
        except (RuntimeError, TypeError, ValueError) as err:
            raise TypeError(f"labels must be a 1-D sequence of integer class labels; got {type(labels).__name__}"
                            ) from err
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {int(t.min())}")
    return t.clone()


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(check_int("seed", seed))


def _check_ratio(ratio: float) -> float:
    return check_real("ratio", ratio, minimum=0.0, maximum=1.0)


def _num_classes(labels: torch.Tensor, num_classes: int | None) -> int:
    seen = int(labels.max()) + 1 if labels.numel() else 0
    if num_classes is None:
        return seen
    num_classes = check_int("num_classes", num_classes, minimum=0)
    if num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but labels go up to {seen - 1}")
    return int(num_classes)


def _pick(members: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    """Exactly ``round(ratio * len(members))`` of ``members``, uniformly without replacement."""
    n_flip = int(round(ratio * len(members)))
    return members[torch.randperm(len(members), generator=g)[:n_flip]]


def _flip_within(labels: torch.Tensor, idx: torch.Tensor, classes: torch.Tensor, g: torch.Generator) -> None:
    """Flip ``labels[idx]`` (all members of ``classes``) to another member, uniformly."""
    k = len(classes)
    pos = torch.searchsorted(classes, labels[idx])  # position of each label inside the sorted subset
    shift = torch.randint(1, k, (len(idx),), generator=g)
    labels[idx] = classes[(pos + shift) % k]


def symmetric_noise(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    ratio: float,
    *,
    num_classes: int | None = None,
    seed: int | torch.Generator = 0,
) -> NoisyLabels:
    """Flip exactly ``round(ratio * N)`` labels, each to a uniformly drawn other class.

    Args:
        labels: integer class labels, shape ``(N,)``.
        ratio: noise ratio gamma in ``[0, 1]``.
        num_classes: number of classes (default: ``max(labels) + 1``); must be >= 2
            when anything is flipped.
        seed: an ``int`` seed or a ``torch.Generator``.

    Returns:
        :class:`NoisyLabels` ``(labels, mask)``.

    Example:
        >>> out = symmetric_noise(torch.arange(10) % 5, 0.3, num_classes=5, seed=0)
        >>> int(out.mask.sum()), bool((out.labels[out.mask] != (torch.arange(10) % 5)[out.mask]).all())
        (3, True)
    """
    y = _as_labels(labels)
    ratio = _check_ratio(ratio)
    k = _num_classes(y, num_classes)
    g = _generator(seed)
    n_flip = int(round(ratio * len(y)))
    mask = torch.zeros(len(y), dtype=torch.bool)
    if n_flip == 0:
        return NoisyLabels(y, mask)
    if k < 2:
        raise ValueError(f"symmetric noise needs at least 2 classes, got num_classes={k}")
    idx = torch.randperm(len(y), generator=g)[:n_flip]
    y[idx] = (y[idx] + torch.randint(1, k, (n_flip,), generator=g)) % k
    mask[idx] = True
    return NoisyLabels(y, mask)


def asymmetric_noise(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    ratio: float,
    *,
    classes: Sequence[int],
    seed: int | torch.Generator = 0,
) -> NoisyLabels:
    """Symmetric noise restricted to a class subset.

    Exactly ``round(ratio * N_s)`` of the ``N_s`` samples whose label is in
    ``classes`` are flipped, each to another class of ``classes``; labels outside the
    subset are untouched (the paper's noise on the ImageNet classes overlapping CIFAR-100).

    Args:
        labels: integer class labels, shape ``(N,)``.
        ratio: noise ratio inside the subset, in ``[0, 1]``.
        classes: the subset (at least 2 distinct classes).
        seed: an ``int`` seed or a ``torch.Generator``.

    Example:
        >>> y = torch.arange(12) % 6
        >>> out = asymmetric_noise(y, 0.5, classes=[0, 1, 2], seed=0)
        >>> int(out.mask.sum()), set(out.labels[out.mask].tolist()) <= {0, 1, 2}
        (3, True)
    """
    y = _as_labels(labels)
    ratio = _check_ratio(ratio)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):
        raise TypeError(f"classes must be a sequence of class indices; got {type(classes).__name__}")
    subset = torch.as_tensor(sorted({check_int("classes[i]", c, minimum=0) for c in classes}), dtype=torch.long)
    if len(subset) < 2:
        raise ValueError(f"classes must hold at least 2 distinct classes, got {list(classes)!r}")
    g = _generator(seed)
    idx = _pick(torch.nonzero(torch.isin(y, subset)).flatten(), ratio, g)
    mask = torch.zeros(len(y), dtype=torch.bool)
    if len(idx):
        _flip_within(y, idx, subset, g)
        mask[idx] = True
    return NoisyLabels(y, mask)


def pair_flip_noise(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    ratio: float,
    *,
    mapping: Mapping[int, int] | None = None,
    num_classes: int | None = None,
    seed: int | torch.Generator = 0,
) -> NoisyLabels:
    """Class-pair flips: ``round(ratio * N_m)`` of the samples whose class is a key of
    ``mapping`` get label ``mapping[c]`` (``N_m`` = number of such samples).

    Args:
        labels: integer class labels, shape ``(N,)``.
        ratio: noise ratio among the mapped classes, in ``[0, 1]``.
        mapping: source class -> target class (``c != mapping[c]``); default
            ``c -> (c + 1) % num_classes`` for every class.
        num_classes: number of classes for the default mapping.
        seed: an ``int`` seed or a ``torch.Generator``.

    Example:
        >>> out = pair_flip_noise(torch.tensor([0, 0, 1, 1]), 1.0, mapping={0: 1}, seed=0)
        >>> out.labels.tolist(), out.mask.tolist()
        ([1, 1, 1, 1], [True, True, False, False])
    """
    y = _as_labels(labels)
    ratio = _check_ratio(ratio)
    if mapping is None:
        k = _num_classes(y, num_classes)
        if k < 2:
            raise ValueError(f"pair flips need at least 2 classes, got num_classes={k}")
        mapping = {c: (c + 1) % k for c in range(k)}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"mapping must map source classes to target classes (a dict); got {type(mapping).__name__}")
    if not mapping:
        raise ValueError("mapping is empty; pass at least one source class -> target class (or None for c -> c + 1)")
    for s, t in mapping.items():
        check_int("mapping keys", s, minimum=0)
        check_int("mapping values", t)
    bad = {int(s): int(t) for s, t in mapping.items() if int(s) == int(t) or int(t) < 0}
    if bad:
        raise ValueError(f"mapping must send each class to a different, non-negative class; got {bad}")
    g = _generator(seed)
    src = torch.as_tensor(sorted(int(s) for s in mapping), dtype=torch.long)
    lut = torch.arange(max(int(y.max()) + 1 if len(y) else 0, int(src.max()) + 1))
    for s, t in mapping.items():
        lut[int(s)] = int(t)
    idx = _pick(torch.nonzero(torch.isin(y, src)).flatten(), ratio, g)
    mask = torch.zeros(len(y), dtype=torch.bool)
    y[idx] = lut[y[idx]]
    mask[idx] = True
    return NoisyLabels(y, mask)


def swap_pairs(num_pairs: int, ratio: float, *, seed: int | torch.Generator = 0) -> NoisyLabels:
    """Swap the texts of ``round(ratio * num_pairs)`` image-text pairs among themselves.

    The chosen pairs are permuted by a random cyclic shift of a random order, so that
    no chosen image keeps its own text (a derangement); with a single chosen pair
    nothing can be swapped and a ``ValueError`` is raised.

    Args:
        num_pairs: number of image-text pairs ``N``.
        ratio: fraction of pairs whose text is replaced, in ``[0, 1]``.
        seed: an ``int`` seed or a ``torch.Generator``.

    Returns:
        :class:`NoisyLabels` where ``labels[i]`` is the index of the text now paired
        with image ``i`` (identity where ``mask`` is ``False``).

    Example:
        >>> out = swap_pairs(10, 0.4, seed=0)
        >>> int(out.mask.sum()), bool((out.labels[out.mask] != torch.arange(10)[out.mask]).all())
        (4, True)
    """
    check_int("num_pairs", num_pairs, minimum=0)
    ratio = _check_ratio(ratio)
    g = _generator(seed)
    text = torch.arange(int(num_pairs))
    mask = torch.zeros(int(num_pairs), dtype=torch.bool)
    n_swap = int(round(ratio * num_pairs))
    if n_swap == 0:
        return NoisyLabels(text, mask)
    if n_swap == 1:
        raise ValueError(f"ratio={ratio} of {num_pairs} pairs selects 1 pair; swapping needs at least 2")
    idx = torch.randperm(int(num_pairs), generator=g)[:n_swap]
    text[idx] = idx.roll(1)
    mask[idx] = True
    return NoisyLabels(text, mask)
