"""The rows of a reference cache: :class:`_FeatureTable`, each written once, and the checks of what enters it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nmtune._validation import check_features
from nmtune.reference_cache._storage import _CacheFolder, _dtype_name, _MemoryRows, _MmapRows, _parse_dtype


def _key_indices(keys: Any, num_examples: int) -> np.ndarray:
    """``keys`` as an array of row indices: 1-D, integer, in range, no duplicates."""
    if not isinstance(keys, Tensor):
        try:
            keys = torch.as_tensor(keys)
        except (RuntimeError, TypeError, ValueError) as err:
            raise TypeError(f"keys must be a 1-D integer tensor of example indices; got {type(keys).__name__}") from err
    if keys.is_meta or keys.is_complex():
        raise TypeError(f"keys must be a 1-D integer tensor of example indices with values; got {keys.dtype} "
                        f"on {keys.device}")
    if keys.dim() != 1 or keys.numel() == 0 or keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise ValueError(
            f"keys must be a non-empty 1-D integer tensor of example indices; got dtype {keys.dtype}, "
            f"shape {tuple(keys.shape)}"
        )
    idx = keys.detach().cpu().numpy().astype(np.int64, copy=False)
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= num_examples:
        bad = low if low < 0 else high
        raise ValueError(f"key {bad} is outside [0, {num_examples}) (the cache holds num_examples rows)")
    uniq, counts = np.unique(idx, return_counts=True)
    if uniq.size != idx.size:
        raise ValueError(
            f"duplicated key(s) {uniq[counts > 1][:5].tolist()} in one batch: each example needs its own key "
            "(an index column with one value per example)"
        )
    return idx


def _verify_rows(idx: np.ndarray, cached: Tensor, recomputed: Tensor, tol: float) -> None:
    """Refuse recomputed rows that differ from the cached ones by more than ``tol`` (relative; 0: any bit)."""
    cached = cached.to("cpu", torch.float64)
    new = recomputed.to("cpu", torch.float64)
    if tol == 0.0:
        diff = (new != cached).any(dim=1).double()
    else:
        diff = (new - cached).norm(dim=1) / cached.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    bad = ~(diff <= tol)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"F recomputed for key {int(idx[i])} differs from the cached F (relative difference "
            f"{float(diff[i]):.3g} > verify_tol={tol}): the reference features are not a function of "
            "the example, e.g. random augmentation in the data pipeline or a model changed since the cache was "
            "filled; turn augmentation off for the cached run or train without the cache"
        )


def _check_new_rows(features: Any, num_keys: int) -> None:
    """``features``: one finite row ``(D,)`` per key, with values (the cache stores them)."""
    check_features("features", features, matrix=True, needs_values=True)
    if features.shape[0] != num_keys:
        raise ValueError(f"features must have shape (B, D), D >= 1, with B = {num_keys} keys; got {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):  # the rows are copied to the cache's storage anyway
        raise ValueError("features hold NaN or Inf; the cache stores only finite reference features")


def _check_fit(features: Tensor, dim: int | None, dtype: torch.dtype | None) -> None:
    if features.shape[1] != dim:
        raise ValueError(f"features have width {features.shape[1]}; the cache holds D = {dim}")
    if features.dtype != dtype:
        raise TypeError(f"features are {features.dtype}; the cache holds {dtype} (the model's dtype changed?)")


class _FeatureTable:
    """``num_examples`` rows of features, each written once, in memory or memory-mapped in a folder.

    A ``filled`` bitmap says which rows hold data; a row written again is compared with
    the stored one (``verify_tol``; ``verified`` counts them), never overwritten; on disk,
    written rows become valid on :meth:`commit`, and ``meta.json`` records shape, dtype,
    context and the fingerprint of the model the rows come from (``model``).
    """

    def __init__(self, num_examples: int, dim: int | None, dtype: torch.dtype | None, *, path: Path | None,
                 device: torch.device | str, context: dict[str, Any], verify_tol: float, commit_every: int) -> None:
        self.num_examples, self.dim, self.dtype = num_examples, dim, dtype
        self.path, self.context = path, context
        self.verify_tol, self.commit_every = verify_tol, commit_every
        self.verified = self._pending = 0
        self.model: dict[str, str] | None = None
        self._filled = np.zeros(num_examples, dtype=bool)
        self._folder = None if path is None else _CacheFolder(path)
        self._storage: _MemoryRows | _MmapRows
        self._storage = _MemoryRows(torch.device(device)) if self._folder is None else self._folder.rows
        if self._folder is not None and not self._folder.is_new:
            self._reopen(self._folder)
        else:
            self._write_meta()  # no-op in memory
        if self.dim is not None and self.dtype is not None and self._storage.data is None:
            self._allocate(self.dim, self.dtype)

    def _reopen(self, folder: _CacheFolder) -> None:
        asked = {"num_examples": self.num_examples, "dim": self.dim, "dtype": _dtype_name(self.dtype)}
        meta = folder.read_meta(asked, self.context)
        self.model = meta.get("model")
        if meta.get("dim") is not None and meta.get("dtype") is not None:
            self.dim, self.dtype = int(meta["dim"]), _parse_dtype(meta["dtype"])
            self._filled = folder.rows.reopen(self.num_examples, self.dim, self.dtype)

    def _write_meta(self) -> None:
        if self._folder is not None:
            self._folder.write_meta(num_examples=self.num_examples, dim=self.dim, dtype=_dtype_name(self.dtype),
                                    context=self.context, model=self.model)

    def _allocate(self, dim: int, dtype: torch.dtype) -> None:
        self.dim, self.dtype = dim, dtype
        self._storage.allocate(self.num_examples, dim, dtype)
        self._write_meta()

    def record_model(self, fingerprint: dict[str, str]) -> None:
        """Record the fingerprint of the model the rows come from (in ``meta.json`` on disk)."""
        self.model = fingerprint
        self._write_meta()

    def missing(self, idx: np.ndarray) -> np.ndarray:
        """The rows of ``idx`` that hold no data."""
        return idx[~self._filled[idx]] if self.dim is not None else idx

    def read(self, idx: np.ndarray, device: torch.device) -> Tensor:
        """The rows of ``idx`` (filled ones) on ``device``."""
        return self._storage.read(idx).to(device, non_blocking=True)

    def write(self, idx: np.ndarray, features: Tensor) -> None:
        """Write the rows of ``idx`` not filled yet; compare the others with what is stored."""
        _check_new_rows(features, idx.size)
        if self._storage.data is None:
            self._allocate(self.dim or int(features.shape[1]), self.dtype or features.dtype)
        _check_fit(features, self.dim, self.dtype)
        rows = features.detach()
        old = self._filled[idx]
        if old.any():
            self.verified += int(old.sum())
            _verify_rows(idx[old], self._storage.read(idx[old]), rows[torch.from_numpy(old).to(rows.device)],
                         self.verify_tol)
        new = ~old
        if new.any():
            self._storage.write(idx[new], rows[torch.from_numpy(new).to(rows.device)])
            self._filled[idx[new]] = True
            self._pending += 1
            if self._pending >= self.commit_every:
                self.commit()

    def commit(self) -> None:
        """Make every stored row durable and valid on disk (no-op in memory)."""
        self._storage.commit(self._filled)
        self._pending = 0

    def close(self) -> None:
        """Commit and release the file lock; the table is unusable afterwards."""
        if self._folder is not None and not self._folder.closed:
            self.commit()
            self._folder.release()

    @property
    def num_filled(self) -> int:
        return int(self._filled.sum())

    @property
    def resident_bytes(self) -> int:
        return self._storage.resident_bytes() + self._filled.nbytes

    @property
    def disk_bytes(self) -> int:
        return self._storage.disk_bytes()
