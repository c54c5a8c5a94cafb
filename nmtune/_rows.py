"""Row access to ``(features, labels)`` for :func:`~nmtune.fit` and :func:`~nmtune.evaluate`.

Three sources, one interface (``n``, ``d``, ``dtype``, ``streamed``, :meth:`_Rows.batch`,
:meth:`_Rows.span`):

* :class:`_TensorRows`: tensors (and in-memory NumPy arrays, zero-copy) already in
  memory, moved to the training device once;
* :class:`_ArrayRows`: a memory-mapped NumPy array (``np.load(..., mmap_mode="r")``,
  ``np.lib.format.open_memmap``): each batch gathers its rows from the mapping, so
  the private memory of a pass is a batch, not the file;
* :class:`_DatasetRows`: any indexable dataset of ``(features, label)`` rows
  (``len(ds)`` and ``ds[i]``), stacked per batch.

A streamed source is validated (finite features, label range) and fingerprinted in one
chunked pass (:func:`_scan`); a batch of a streamed source is bit-identical to the same
batch of the in-memory tensor, so ``fit`` trains the same head from either.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from nmtune import functional as NF

__all__: list[str] = []  # private module

#: Rows per chunk of a validation or fingerprint pass: about 4 MiB (4096 rows of float32 at D = 256).
_CHUNK_BYTES = 4 << 20
#: Rows sampled for the content fingerprint.
_SAMPLE_ROWS = 256


def describe(x: Any) -> str:
    """``x`` for a message: dtype and shape of a tensor or array, else its type."""
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"NumPy array of dtype {x.dtype} and shape {x.shape}"
    return type(x).__name__


def is_streamed(x: Any) -> bool:
    """Whether ``x`` is read batch by batch: a memory-mapped array or an indexable dataset."""
    if isinstance(x, np.memmap):
        return True
    if isinstance(x, (Tensor, np.ndarray, list, tuple, str, bytes, dict)):
        return False
    return hasattr(x, "__getitem__") and hasattr(x, "__len__")


def chunk_rows(d: int, itemsize: int = 4, at_least: int = 1) -> int:
    """Rows of width ``d`` in one chunk of about ``_CHUNK_BYTES``."""
    return max(at_least, _CHUNK_BYTES // max(1, d * itemsize))


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


class _Rows:
    """``n`` rows of ``d`` features (``dtype``) with their labels; see the module docstring."""

    n: int
    d: int
    dtype: torch.dtype
    streamed: bool = True
    #: Content fingerprints of the features and labels, when a checkpoint needs them.
    digests: tuple[str | None, str | None] = (None, None)

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(B, D)`` and labels ``(B, ...)`` of the rows ``idx`` (CPU for a streamed source)."""
        raise NotImplementedError

    def span(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Rows ``start:stop`` (a view where the source allows)."""
        return self.batch(torch.arange(start, stop))

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
        """``(start, features, labels)`` in consecutive chunks of ``size`` rows."""
        size = size or chunk_rows(self.d)
        for start, stop in _spans(self.n, size):
            yield (start, *self.span(start, stop))


class _TensorRows(_Rows):
    """In-memory tensors: batches are index gathers on their device."""

    streamed = False

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.n, self.d, self.dtype = x.shape[0], x.shape[1], x.dtype

    def to(self, device: torch.device, dtype: torch.dtype, label_dtype: torch.dtype | None = None) -> _TensorRows:
        return _TensorRows(self.x.to(device, dtype), self.y.to(device, label_dtype))

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]

    def span(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return self.x[start:stop], self.y[start:stop]


def _labels_array(labels: Any, n: int) -> np.ndarray | Tensor:
    """Labels or targets beside a streamed feature array: a tensor or a NumPy array with ``n`` rows."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu()
    elif not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a torch.Tensor or a NumPy array; got {describe(labels)}")
    if isinstance(labels, np.ndarray) and labels.dtype.kind not in "biuf":
        raise TypeError(f"labels must be a numeric array; got {describe(labels)}")
    if labels.ndim < 1 or labels.shape[0] != n:
        raise ValueError(f"features has {n} rows but labels has shape {tuple(labels.shape)}; expected the same N")
    return labels


def _from_numpy(a: np.ndarray) -> Tensor:
    """A tensor owning a copy of a small gathered block (never a view of a read-only mapping)."""
    return torch.from_numpy(np.array(a, copy=True, order="C"))


class _ArrayRows(_Rows):
    """A memory-mapped (or any) NumPy array, gathered a batch at a time."""

    def __init__(self, x: np.ndarray, y: Any) -> None:
        if x.dtype.kind != "f":
            raise TypeError(f"features must be floating-point (N, D) features; got a {describe(x)}")
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"features must have shape (N, D) with D >= 1; got a {describe(x)}")
        if x.shape[0] < 1:
            raise ValueError(f"features is empty (got shape {x.shape}); expected at least one row")
        self.x = x
        self.n, self.d = int(x.shape[0]), int(x.shape[1])
        self.dtype = torch.from_numpy(np.zeros(0, dtype=x.dtype)).dtype
        self.y = _labels_array(y, self.n)

    def _labels(self, idx: np.ndarray | slice) -> Tensor:
        if isinstance(self.y, Tensor):
            return self.y[torch.from_numpy(idx) if isinstance(idx, np.ndarray) else idx].clone()
        return _from_numpy(self.y[idx])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        i = idx.cpu().numpy()
        return _from_numpy(self.x[i]), self._labels(i)

    def span(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        return _from_numpy(self.x[start:stop]), self._labels(slice(start, stop))


class _DatasetRows(_Rows):
    """Any indexable dataset of ``(features, label)`` rows."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.n = len(ds)
        if self.n < 1:
            raise ValueError("features (a dataset) is empty; expected at least one (features, label) row")
        x0, _ = self._row(0)
        if not x0.is_floating_point():
            raise TypeError(f"features (a dataset) must yield floating-point feature rows; row 0 is a {describe(x0)}")
        if x0.dim() != 1 or x0.shape[0] < 1:
            raise ValueError(f"features (a dataset) must yield feature rows of shape (D,); row 0 is a {describe(x0)}")
        self.d, self.dtype = int(x0.shape[0]), x0.dtype

    def _row(self, i: int) -> tuple[Tensor, Tensor]:
        row = self.ds[i]
        if not isinstance(row, (tuple, list)) or len(row) != 2:
            got = f"a {type(row).__name__} of {len(row)}" if isinstance(row, (tuple, list)) else describe(row)
            raise TypeError(f"features (a dataset) must yield (features, label) pairs; row {i} is {got}")
        with warnings.catch_warnings():  # a read-only NumPy row is copied by the stack below, never written
            warnings.simplefilter("ignore", UserWarning)
            return torch.as_tensor(row[0]), torch.as_tensor(row[1])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        rows = [self._row(int(i)) for i in idx.tolist()]
        xs = [r[0] for r in rows]
        for i, x in zip(idx.tolist(), xs):
            if x.shape != (self.d,) or x.dtype != self.dtype:
                raise ValueError(f"features (a dataset) row {i} is a {describe(x)}; row 0 was a {self.dtype} "
                                 f"row of shape ({self.d},): every row must match")
        return torch.stack(xs), torch.stack([r[1] for r in rows])


def rows_of(features: Any, labels: Any) -> _Rows:
    """The streamed source for ``features`` (a memory-mapped array or a dataset) and ``labels``."""
    if isinstance(features, np.ndarray):
        return _ArrayRows(features, labels)
    if labels is not None:
        raise ValueError("features is a dataset of (features, label) rows: its labels come from the rows; "
                         f"pass labels=None (got {describe(labels)})")
    return _DatasetRows(features)


class _Digest:
    """A cheap content hash of rows seen in order: shape, dtype, 256 evenly spaced rows and the
    float64 sum and sum of squares, accumulated chunk by chunk (the same value for a tensor, a
    memory-mapped array or a dataset of the same rows)."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.h = hashlib.sha256(f"{shape}|{dtype}".encode())
        self.sample = torch.linspace(0, n - 1, steps=min(n, _SAMPLE_ROWS)).long()
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, start: int, rows: Tensor) -> None:
        flat = rows.detach().reshape(rows.shape[0], -1).to("cpu", torch.float64)
        inside = self.sample[(self.sample >= start) & (self.sample < start + rows.shape[0])] - start
        self.h.update(flat[inside].contiguous().numpy().tobytes())
        self.sums += torch.stack([flat.sum(), flat.square().sum()])

    def hexdigest(self) -> str:
        self.h.update(self.sums.numpy().tobytes())
        return self.h.hexdigest()[:20]


@dataclass
class Scan:
    """What one pass over a source found: the largest label and the content fingerprints."""

    max_label: int
    features_digest: str | None
    labels_digest: str | None


def check_label_block(y: Tensor, start: int, name: str = "labels", *, num_classes: int | None = None) -> None:
    """Integer class indices in ``[0, num_classes)``; the first offending label is named by its row."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices of shape (N,); got {describe(y)}")
    if y.dim() != 1:
        raise ValueError(f"{name} must have shape (N,); got {describe(y)}")
    bad = y < 0 if num_classes is None else (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        want = "be class indices >= 0" if num_classes is None else f"lie in [0, num_classes={num_classes})"
        raise ValueError(f"{name} must {want}; got {int(y[i])} at index {start + i}")


def scan(rows: _Rows, *, check: bool, classes: bool, digest: bool, hint: str) -> Scan:
    """One chunked pass: finite features and valid labels (``check``), the largest label
    (``classes``: integer class indices) and the fingerprints (``digest``)."""
    fd = _Digest(rows.n, (rows.n, rows.d), rows.dtype) if digest else None
    ld: _Digest | None = None
    top = -1
    for start, x, y in rows.chunks():
        if check:
            NF.validate_finite(x, f"features (rows {start}:{start + x.shape[0]})", hint=hint)
            if classes:
                check_label_block(y, start)
        if classes and y.numel():
            top = max(top, int(y.max()))
        if digest:
            if ld is None:
                ld = _Digest(rows.n, (rows.n, *y.shape[1:]), y.dtype)
            fd.update(start, x)  # type: ignore[union-attr]
            ld.update(start, y)
    return Scan(top, fd.hexdigest() if fd else None, ld.hexdigest() if ld else None)
