"""Where the rows of a :class:`~nmtune.reference_cache.ReferenceCache` live.

* :class:`_MemoryRows`: a tensor (on a device); nothing persists.
* :class:`_MmapRows`: a memory-mapped file ``features.bin``; ``filled.bin``, a bitmap
  replaced atomically, marks the rows that are committed.
* :class:`_CacheFolder`: the directory of a disk cache, held under an exclusive lock,
  with ``meta.json`` saying what its rows are (shape, dtype, context, model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

_FORMAT_VERSION = 1
_META = "meta.json"
_DATA = "features.bin"
_FILLED = "filled.bin"
_LOCK = "lock"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype; got {name!r}")
    return dtype


def _describe_changes(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changes.append(f"{kind} {key!r}: cached {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}")
    return changes


def _lock(path: Path) -> Any:
    try:
        import fcntl
    except ModuleNotFoundError:  # pragma: no cover - Windows: no advisory lock
        return None
    fh = open(path / _LOCK, "a+")  # noqa: SIM115 - held open for the cache's lifetime
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        fh.close()
        raise RuntimeError(
            f"another process has the reference cache {path} open; under DDP give each rank its own path "
            "(e.g. path=f'.../rank{rank}')"
        ) from err
    return fh


class _MemoryRows:
    """Rows in a tensor (on ``device``); nothing persists."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.data: Tensor | None = None

    def allocate(self, n: int, dim: int, dtype: torch.dtype) -> None:
        self.data = torch.zeros(n, dim, dtype=dtype, device=self.device)

    def read(self, idx: np.ndarray) -> Tensor:
        return self.data.index_select(0, torch.from_numpy(idx).to(self.device))  # type: ignore[union-attr]

    def write(self, idx: np.ndarray, rows: Tensor) -> None:
        self.data[torch.from_numpy(idx).to(self.device)] = rows.to(self.device)  # type: ignore[index]

    def commit(self, filled: np.ndarray) -> None:
        pass

    def resident_bytes(self) -> int:
        return 0 if self.data is None else self.data.numel() * self.data.element_size()

    def disk_bytes(self) -> int:
        return 0


class _MmapRows:
    """Rows in a memory-mapped file ``features.bin``; ``filled.bin`` marks committed rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: np.memmap | None = None
        self.dtype: torch.dtype | None = None

    def allocate(self, n: int, dim: int, dtype: torch.dtype, *, create: bool = True) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        file = self.path / _DATA
        if create and not file.exists():
            with open(file, "wb") as fh:  # a sparse file: untouched rows take no disk space
                fh.truncate(n * dim * itemsize)
        elif file.stat().st_size != n * dim * itemsize:
            raise ValueError(f"{file} has {file.stat().st_size} bytes; expected {n} x {dim} x {itemsize}")
        self.data = np.memmap(file, dtype=np.uint8, mode="r+", shape=(n, dim * itemsize))
        self.dtype = dtype

    def read(self, idx: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data[idx])).view(self.dtype)  # type: ignore[index]

    def write(self, idx: np.ndarray, rows: Tensor) -> None:
        self.data[idx] = rows.detach().cpu().contiguous().view(torch.uint8).numpy()  # type: ignore[index]

    def commit(self, filled: np.ndarray) -> None:
        if self.data is not None:
            self.data.flush()  # rows reach the file before the bitmap says they are there
        _atomic_write(self.path / _FILLED, np.packbits(filled).tobytes())

    def reopen(self, n: int, dim: int, dtype: torch.dtype) -> np.ndarray:
        """Map the existing ``features.bin``; returns the committed rows (``filled.bin``)."""
        self.allocate(n, dim, dtype, create=False)
        file = self.path / _FILLED
        if not file.exists():
            return np.zeros(n, dtype=bool)
        bits = np.frombuffer(file.read_bytes(), dtype=np.uint8)
        if bits.size != (n + 7) // 8:
            raise ValueError(f"{file} has {bits.size} bytes; expected {(n + 7) // 8} for {n} examples")
        return np.unpackbits(bits)[:n].astype(bool)

    def resident_bytes(self) -> int:
        return 0  # pages belong to the OS page cache, shared and evictable

    def disk_bytes(self) -> int:
        total = 0
        for name in (_DATA, _FILLED, _META):
            file = self.path / name
            if file.exists():
                total += file.stat().st_blocks * 512 if hasattr(os.stat_result, "st_blocks") else file.stat().st_size
        return total


class _CacheFolder:
    """The directory of a disk cache: an exclusive lock, ``meta.json`` and the rows (:class:`_MmapRows`).

    ``meta.json`` records what the rows are: ``num_examples``, ``dim``, ``dtype``, the
    user's ``context`` and the ``model`` fingerprint; a reopened folder is checked
    against what is asked of it.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = _lock(path)
        self.rows = _MmapRows(path)
        self.closed = False

    @property
    def is_new(self) -> bool:
        """Whether the folder holds no cache yet (no ``meta.json``)."""
        return not (self.path / _META).exists()

    def read_meta(self, asked: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
        """The stored metadata, refused if a value of ``asked`` (``None``: any) or the context differs."""
        meta = json.loads((self.path / _META).read_text(encoding="utf-8"))
        if meta.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"{self.path} has format_version {meta['format_version']}; this nmtune reads {_FORMAT_VERSION}"
            )
        changes = [
            f"{k}: cached {meta.get(k)!r}, asked {v!r}" for k, v in asked.items()
            if v is not None and meta.get(k) is not None and meta.get(k) != v
        ]
        changes += _describe_changes("context", meta.get("context", {}), context)
        if not changes:
            return meta
        raise ValueError(
            f"the reference cache at {self.path} was built for something else: {'; '.join(changes)}. "
            "F would be stale: use another path (or delete this one) for the new setting"
        )

    def write_meta(self, **meta: Any) -> None:
        """Replace ``meta.json`` atomically."""
        meta["format_version"] = _FORMAT_VERSION
        _atomic_write(self.path / _META, json.dumps(meta, indent=2, sort_keys=True).encode())

    def release(self) -> None:
        """Unmap the rows and release the lock."""
        self.rows.data = None
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        self.closed = True
