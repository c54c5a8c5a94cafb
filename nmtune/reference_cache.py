"""A per-example cache of the consistency reference ``F``: :class:`ReferenceCache`.

``F`` (the frozen model's pooled features) depends only on the input, so for a
fixed dataset without random augmentation it is the same every epoch. The cache
stores it per training example on the first epoch (or in an explicit pre-pass,
:meth:`ReferenceCache.precompute`) and serves it afterwards, so later epochs skip
the reference forward pass.

```
epoch 1: x ─► backbone (adapter off) ─► F ─► cache.store(keys, F)
epoch 2: keys ─► cache.lookup(keys) ─► F            (no reference forward)
```

Keys are integer example indices ``0 <= key < num_examples`` taken from the data
(an index column). Storage is a tensor in memory (``path=None``) or a
memory-mapped file on disk (``path=...``), ``num_examples x dim`` in the model's
dtype. The cache refuses, with a clear error, every case where ``F`` would not be a
function of the key: a model whose reference path is random (dropout, batch
statistics), a model or adapter state different from the one the cache was built
for (a cheap fingerprint), a changed user context (tokenizer, max length,
transform), a stored ``F`` that a recomputation contradicts (random augmentation),
and a batch with a duplicated or out-of-range key.

On disk, rows are written to the data file first and only then marked filled in a
bitmap that is replaced atomically (write to a temporary file, ``fsync``,
``os.replace``), so an interrupted run never leaves a half-written row readable as
valid: a row not yet committed is simply recomputed after a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmtune._validation import check_int, check_real

__all__ = ["ReferenceCache", "model_fingerprint"]

_FORMAT_VERSION = 1
_META = "meta.json"
_DATA = "features.bin"
_FILLED = "filled.bin"
_LOCK = "lock"
_SAMPLES_PER_TENSOR = 64


# ----------------------------------------------------------------------------- fingerprint
def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers."""
    for _ in range(8):
        inner = getattr(model, "module", None) if type(model).__name__ in ("DistributedDataParallel", "DataParallel") \
            else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _is_lora_model(model: nn.Module) -> bool:
    from nmtune.lora import NMTuneLoraModel

    return isinstance(_unwrap(model), NMTuneLoraModel)


def _merged_lora_layers(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer) and getattr(m, "merged", False)]


def _frozen_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The tensors ``F`` depends on: frozen parameters and buffers (LoRA weights excluded)."""
    skip = ("lora_", "modules_to_save.")
    named = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    named += list(model.named_buffers())
    return [(n, t) for n, t in named if not any(s in n for s in skip)]


def _sample_bytes(t: Tensor) -> bytes:
    if t.is_meta:
        return b"meta"
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    idx = torch.linspace(0, n - 1, steps=min(n, _SAMPLES_PER_TENSOR), device=flat.device).long()
    return flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _reference_settings(model: nn.Module) -> dict[str, Any]:
    inner = _unwrap(model)
    if not _is_lora_model(inner):
        return {"class": type(inner).__name__}
    pooling = inner.pooling if isinstance(inner.pooling, str) else getattr(inner.pooling, "__qualname__", "custom")
    cfg = inner.peft_model.peft_config[inner.peft_model.active_adapter]
    return {
        "class": type(inner.base_model).__name__,
        "pooling": pooling,
        "reference_eval": inner.reference_eval,
        "freeze_batchnorm": inner.freeze_batchnorm,
        "init_lora_weights": str(getattr(cfg, "init_lora_weights", None)),
        "bias": str(getattr(cfg, "bias", None)),
    }


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """A cheap fingerprint of what the reference features ``F`` of ``model`` depend on.

    Three parts, so that a mismatch can say what changed:

    * ``"architecture"``: names, shapes and dtypes of every frozen tensor;
    * ``"weights"``: 64 evenly spaced values of every frozen tensor plus all of the
      last one (cheap, not cryptographic: a change confined to a few values can go
      unnoticed, which the verification on the first hits catches);
    * ``"reference"``: the settings of the reference path (for an
      :class:`nmtune.NMTuneLoraModel`: pooling, ``reference_eval``,
      ``freeze_batchnorm``, the adapter's ``init_lora_weights`` and ``bias``).

    For an ``NMTuneLoraModel`` the frozen tensors are the base model's (the LoRA
    weights and the head do not enter ``F``); for any other module, the parameters
    with ``requires_grad=False`` and the buffers.

    Example:
        >>> net = nn.Linear(3, 2).requires_grad_(False)
        >>> fp = model_fingerprint(net)
        >>> sorted(fp)
        ['architecture', 'reference', 'weights']
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> model_fingerprint(net)["weights"] == fp["weights"]
        False
    """
    inner = _unwrap(model)
    target = inner.base_model if _is_lora_model(inner) else inner
    tensors = _frozen_tensors(target)
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, t in tensors:
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        weights.update(_sample_bytes(t))
    if tensors and not tensors[-1][1].is_meta:
        weights.update(tensors[-1][1].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = json.dumps(_reference_settings(inner), sort_keys=True)
    return {
        "architecture": arch.hexdigest()[:16],
        "weights": weights.hexdigest()[:16],
        "reference": settings,
    }


def _check_deterministic(model: nn.Module) -> None:
    """Refuse a model whose reference path is random or depends on the batch."""
    inner = _unwrap(model)
    if _is_lora_model(inner):
        if not inner.reference_eval:
            raise ValueError(
                "the model computes F with reference_eval=False, i.e. in training mode (dropout active, BatchNorm on "
                "batch statistics), so F is not a function of the example and cannot be cached; wrap it with "
                "reference_eval=True"
            )
        merged = _merged_lora_layers(inner.peft_model)
        if merged:
            raise ValueError(
                f"{len(merged)} LoRA layer(s) have merged adapters: disable_adapter() no longer gives the pre-trained "
                "model, so F would be wrong; call unmerge_adapter() before attaching the cache"
            )
        return
    params = list(inner.parameters())
    if not params and not list(inner.buffers()):
        raise ValueError(f"{type(inner).__name__} has no parameters or buffers to fingerprint")
    if params and all(p.requires_grad for p in params):
        raise ValueError(
            f"every parameter of {type(inner).__name__} requires grad, so its features change as it trains and cannot "
            "be cached; pass the frozen reference model (e.g. copy.deepcopy(model).requires_grad_(False).eval())"
        )
    training = [n or type(inner).__name__ for n, m in inner.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{len(training)} module(s) of {type(inner).__name__} are in training mode (e.g. {training[:3]}): dropout "
            "and batch statistics make the reference features random; call .eval() on the reference model"
        )


def _describe_changes(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changes.append(f"{kind} {key!r}: cached {old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}")
    return changes


# ----------------------------------------------------------------------------- storage helpers
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype; got {name!r}")
    return dtype


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

    def load_filled(self, n: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------- the cache
class ReferenceCache:
    """Reference features ``F`` per training example, in memory or memory-mapped on disk.

    The model calls :meth:`check_model` once when the cache is attached, then per
    batch :meth:`lookup` (every key cached: ``F`` from the cache, else ``None`` and
    the model runs its reference forward) and, after a miss, :meth:`store`.
    ``hits`` and ``misses`` count examples served from the cache and examples whose
    ``F`` was computed by a forward pass.

    Verification: the first ``verify_batches`` lookups whose keys are all cached
    answer ``None`` anyway, so that the model recomputes ``F`` and :meth:`store`
    compares it with the cached rows (a stored row is never overwritten); a relative
    difference above ``verify_tol`` raises: ``F`` is not a function of the key
    (random augmentation in the data pipeline, or a changed model).

    Distributed: each rank holds its own cache of the keys it sees (in memory, or
    its own ``path``: two processes cannot open one path). When the sampler
    reshuffles across ranks each epoch, a key first seen on another rank is a miss
    on this one: it falls back to the forward pass, is counted in ``misses`` and
    stored, so each rank's cache fills up over the epochs. A pre-pass over the whole
    dataset on every rank (:meth:`precompute`) removes those misses.

    Args:
        num_examples: Number of examples ``N``; keys are ``0 <= key < N``.
        dim: Feature width ``D``; ``None`` takes it from the first :meth:`store`.
        dtype: Feature dtype; ``None`` takes it from the first :meth:`store`
            (the model's dtype). Stored as is, so cached ``F`` is bit-identical.
        path: A directory for a memory-mapped cache (created if needed; reopened,
            checked and resumed if it holds one); ``None`` keeps the rows in memory.
        device: Where an in-memory cache keeps its rows (``"cpu"`` or a GPU).
        context: What ``F`` depends on besides the model, declared by the user
            (JSON values: tokenizer name, ``max_length``, image transform name...);
            a reopened cache with a different context is refused.
        verify_batches: Fully cached batches to recompute and compare (0: none);
            the attribute counts down as they are used.
        verify_tol: Largest relative row difference ``||F_new - F|| / ||F||``
            accepted by the verification (0: bit-identical).
        commit_every: On disk, mark newly stored rows as valid every this many
            :meth:`store` calls (and on :meth:`commit` / :meth:`close`); rows not
            yet committed are recomputed after a crash.

    Example:
        >>> ref = nn.Linear(4, 3).requires_grad_(False).eval()
        >>> cache = ReferenceCache(10, context={"transform": "none"})
        >>> cache.check_model(ref)
        >>> keys, x = torch.tensor([3, 7]), torch.randn(2, 4)
        >>> cache.lookup(keys) is None
        True
        >>> cache.store(keys, ref(x))
        >>> cache.verify_batches = 0
        >>> torch.equal(cache.lookup(keys), ref(x))
        True
        >>> cache.hits, cache.misses
        (2, 2)
    """

    def __init__(
        self,
        num_examples: int,
        dim: int | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        context: Mapping[str, Any] | None = None,
        verify_batches: int = 1,
        verify_tol: float = 1e-3,
        commit_every: int = 1,
    ) -> None:
        self.num_examples = check_int("num_examples", num_examples, minimum=1)
        self.dim = None if dim is None else check_int("dim", dim, minimum=1)
        self.dtype = _parse_dtype(dtype) if isinstance(dtype, str) else dtype
        if self.dtype is not None and (not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype or None; got {dtype!r}")
        self.verify_batches = check_int("verify_batches", verify_batches, minimum=0)
        self.verify_tol = check_real("verify_tol", verify_tol, minimum=0.0)
        self.commit_every = check_int("commit_every", commit_every, minimum=1)
        try:
            self.context: dict[str, Any] = json.loads(json.dumps(dict(context or {}), sort_keys=True))
        except TypeError as err:
            raise TypeError(f"context must map names to JSON values (str, int, float, bool, None); {err}") from err
        self.path = None if path is None else Path(path)
        self.hits = self.misses = self.verified = 0
        self._fingerprint: dict[str, str] | None = None
        self._filled = np.zeros(self.num_examples, dtype=bool)
        self._pending = 0
        self._lock_fh = None
        if self.path is None:
            self._storage: _MemoryRows | _MmapRows = _MemoryRows(torch.device(device))
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fh = _lock(self.path)
            self._storage = _MmapRows(self.path)
            if (self.path / _META).exists():
                self._reopen()
            else:
                self._write_meta()
        if self.dim is not None and self.dtype is not None and self._storage.data is None:
            self._allocate(self.dim, self.dtype)

    # -- bookkeeping ------------------------------------------------------------------
    def _reopen(self) -> None:
        meta = json.loads((self.path / _META).read_text(encoding="utf-8"))  # type: ignore[operator]
        if meta.get("format_version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"{self.path} has format_version {meta['format_version']}; this nmtune reads {_FORMAT_VERSION}"
            )
        asked = {"num_examples": self.num_examples, "dim": self.dim,
                 "dtype": None if self.dtype is None else _dtype_name(self.dtype)}
        changes = [
            f"{k}: cached {meta.get(k)!r}, asked {v!r}" for k, v in asked.items()
            if v is not None and meta.get(k) is not None and meta.get(k) != v
        ]
        changes += _describe_changes("context", meta.get("context", {}), self.context)
        if changes:
            raise ValueError(
                f"the reference cache at {self.path} was built for something else: {'; '.join(changes)}. "
                "F would be stale: use another path (or delete this one) for the new setting"
            )
        self._fingerprint = meta.get("model")
        if meta.get("dim") is not None and meta.get("dtype") is not None:
            self.dim, self.dtype = int(meta["dim"]), _parse_dtype(meta["dtype"])
            self._storage.allocate(self.num_examples, self.dim, self.dtype, create=False)  # type: ignore[call-arg]
            self._filled = self._storage.load_filled(self.num_examples)  # type: ignore[union-attr]

    def _write_meta(self) -> None:
        if self.path is None:
            return
        meta = {
            "format_version": _FORMAT_VERSION,
            "num_examples": self.num_examples,
            "dim": self.dim,
            "dtype": None if self.dtype is None else _dtype_name(self.dtype),
            "context": self.context,
            "model": self._fingerprint,
        }
        _atomic_write(self.path / _META, json.dumps(meta, indent=2, sort_keys=True).encode())

    def _allocate(self, dim: int, dtype: torch.dtype) -> None:
        self.dim, self.dtype = dim, dtype
        self._storage.allocate(self.num_examples, dim, dtype)
        self._write_meta()

    def _require_model(self) -> None:
        if self._fingerprint is None:
            raise RuntimeError(
                "call cache.check_model(reference_model) before using the cache (NMTuneLoraModel.set_reference_cache "
                "and precompute do it): the cache records which model its features belong to"
            )

    def _indices(self, keys: Any) -> np.ndarray:
        keys = keys if isinstance(keys, Tensor) else torch.as_tensor(keys)
        if keys.dim() != 1 or keys.numel() == 0 or keys.dtype.is_floating_point or keys.dtype == torch.bool:
            raise ValueError(
                f"keys must be a non-empty 1-D integer tensor of example indices; got dtype {keys.dtype}, "
                f"shape {tuple(keys.shape)}"
            )
        idx = keys.detach().cpu().numpy().astype(np.int64, copy=False)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.num_examples:
            bad = low if low < 0 else high
            raise ValueError(f"key {bad} is outside [0, {self.num_examples}) (the cache holds num_examples rows)")
        uniq, counts = np.unique(idx, return_counts=True)
        if uniq.size != idx.size:
            raise ValueError(
                f"duplicated key(s) {uniq[counts > 1][:5].tolist()} in one batch: each example needs its own key "
                "(an index column with one value per example)"
            )
        return idx

    # -- protocol ----------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Record (fresh cache) or check (filled or reopened cache) the model ``F`` comes from.

        Raises:
            ValueError: The reference path is random (dropout / training mode,
                ``reference_eval=False``, merged adapters, a reference model whose
                parameters all train), or the model differs from the one the cache
                was built for (the message names the changed parts).
        """
        _check_deterministic(model)
        fingerprint = model_fingerprint(model)
        if self._fingerprint is None:
            self._fingerprint = fingerprint
            self._write_meta()
            return
        if fingerprint != self._fingerprint:
            what = {"architecture": "parameter names/shapes/dtypes", "weights": "base weights",
                    "reference": "reference settings"}
            changed = [
                f"{what.get(k, k)} ({self._fingerprint.get(k)} -> {fingerprint.get(k)})"
                for k in sorted(what) if self._fingerprint.get(k) != fingerprint.get(k)
            ]
            where = f" at {self.path}" if self.path is not None else ""
            raise ValueError(
                f"the reference cache{where} was built for a different model: {', '.join(changed)} changed; "
                "its F would be wrong for this one: use a new cache"
            )

    def lookup(self, keys: Tensor) -> Tensor | None:
        """``F`` of every key ``(B, D)`` on ``keys.device``, or ``None`` if one is not cached.

        Raises:
            ValueError: A duplicated or out-of-range key, or keys not a 1-D integer tensor.
        """
        self._require_model()
        idx = self._indices(keys)
        if self.dim is None or not self._filled[idx].all():
            self.misses += idx.size
            return None
        if self.verify_batches > 0:  # let the model recompute these; store() compares
            self.verify_batches -= 1
            self.misses += idx.size
            return None
        self.hits += idx.size
        device = keys.device if isinstance(keys, Tensor) else torch.device("cpu")
        return self._storage.read(idx).to(device, non_blocking=True)

    def get(self, keys: Tensor) -> Tensor:
        """Like :meth:`lookup` but every key must be cached (no verification): for a
        cache filled by :meth:`precompute` whose reference model is gone.

        Raises:
            KeyError: Some keys were never stored (the message lists them).
        """
        self._require_model()
        idx = self._indices(keys)
        missing = idx[~self._filled[idx]] if self.dim is not None else idx
        if missing.size:
            raise KeyError(
                f"{missing.size} key(s) not in the reference cache, e.g. {missing[:5].tolist()}; run "
                "cache.precompute(...) over the whole dataset first"
            )
        self.hits += idx.size
        device = keys.device if isinstance(keys, Tensor) else torch.device("cpu")
        return self._storage.read(idx).to(device, non_blocking=True)

    def store(self, keys: Tensor, features: Tensor) -> None:
        """Store ``F`` ``(B, D)`` of ``keys``; rows already cached are compared, not overwritten.

        Raises:
            ValueError: Bad keys, a shape that does not fit, or a recomputed row that
                differs from its cached one by more than ``verify_tol``.
            TypeError: ``features`` is not a floating tensor of the cache's dtype.
        """
        self._require_model()
        idx = self._indices(keys)
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(f"features must be a floating tensor; got {type(features).__name__}")
        if features.dim() != 2 or features.shape[0] != idx.size:
            raise ValueError(f"features must have shape (B, D) with B = {idx.size} keys; got {tuple(features.shape)}")
        if self._storage.data is None:
            self._allocate(self.dim or int(features.shape[1]), self.dtype or features.dtype)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have width {features.shape[1]}; the cache holds D = {self.dim}")
        if features.dtype != self.dtype:
            raise TypeError(f"features are {features.dtype}; the cache holds {self.dtype} (the model's dtype changed?)")
        rows = features.detach()
        old = self._filled[idx]
        if old.any():
            self._verify(idx[old], rows[torch.from_numpy(old).to(rows.device)])
        new = ~old
        if new.any():
            self._storage.write(idx[new], rows[torch.from_numpy(new).to(rows.device)])
            self._filled[idx[new]] = True
            self._pending += 1
            if self._pending >= self.commit_every:
                self.commit()

    def _verify(self, idx: np.ndarray, rows: Tensor) -> None:
        cached = self._storage.read(idx).to("cpu", torch.float64)
        new = rows.to("cpu", torch.float64)
        if self.verify_tol == 0.0:
            diff = (new != cached).any(dim=1).double()
        else:
            diff = (new - cached).norm(dim=1) / cached.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        bad = ~(diff <= self.verify_tol)
        self.verified += idx.size
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"F recomputed for key {int(idx[i])} differs from the cached F (relative difference "
                f"{float(diff[i]):.3g} > verify_tol={self.verify_tol}): the reference features are not a function of "
                "the example, e.g. random augmentation in the data pipeline or a model changed since the cache was "
                "filled; turn augmentation off for the cached run or train without the cache"
            )

    # -- pre-pass, persistence ---------------------------------------------------------
    def precompute(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        key: str | int = "idx",
        features_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> int:
        """Fill the cache by one pass over ``batches`` (no gradients); returns rows computed.

        Args:
            model: An :class:`nmtune.NMTuneLoraModel` (``F`` = its features with the
                adapter disabled, in eval mode), or a frozen reference model in eval
                mode together with ``features_fn``.
            batches: Dict batches (``key`` names the index column; the rest, label
                columns aside, is passed to the model as keyword arguments) or tuples
                (``key`` is the position of the keys; the model gets ``batch[0]``).
            key: The index column (dicts) or position (tuples).
            features_fn: ``(model, inputs) -> F`` for models other than
                ``NMTuneLoraModel``.

        Example:
            >>> ref = nn.Linear(4, 3).requires_grad_(False).eval()
            >>> data = [{"x": torch.randn(5, 4), "idx": torch.arange(5 * i, 5 * i + 5)} for i in range(2)]
            >>> cache = ReferenceCache(10)
            >>> cache.precompute(ref, data, features_fn=lambda m, b: m(b["x"]))
            10
            >>> cache.get(torch.arange(10)).shape
            torch.Size([10, 3])
        """
        self.check_model(model)
        computed = 0
        with torch.no_grad():
            for batch in batches:
                keys, inputs = _split_batch(batch, key)
                idx = self._indices(keys)
                if self.dim is not None and self._filled[idx].all():
                    continue
                feats = features_fn(model, inputs) if features_fn is not None else _lora_reference(model, inputs)
                self.store(keys, feats)
                computed += int(idx.size)
        self.commit()
        return computed

    def commit(self) -> None:
        """Make every stored row durable and valid on disk (no-op in memory)."""
        self._storage.commit(self._filled)
        self._pending = 0

    def close(self) -> None:
        """Commit and release the file lock; the cache is unusable afterwards."""
        if self.path is not None and self._lock_fh is not None:
            self.commit()
            self._storage.data = None
            self._lock_fh.close()
            self._lock_fh = None

    def __enter__(self) -> ReferenceCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection -----------------------------------------------------------------
    @property
    def num_filled(self) -> int:
        """Examples whose ``F`` is cached."""
        return int(self._filled.sum())

    @property
    def fingerprint(self) -> dict[str, str] | None:
        """The fingerprint of the model the cache was built for (see :func:`model_fingerprint`)."""
        return None if self._fingerprint is None else dict(self._fingerprint)

    @property
    def resident_bytes(self) -> int:
        """Bytes of process memory the rows take (in memory: ``N x D x itemsize``; on disk: 0, page cache aside)."""
        return self._storage.resident_bytes() + self._filled.nbytes

    @property
    def disk_bytes(self) -> int:
        """Bytes allocated on disk (sparse: rows never stored take none)."""
        return self._storage.disk_bytes()

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return (
            f"ReferenceCache(num_examples={self.num_examples}, dim={self.dim}, dtype={self.dtype}, storage={where}, "
            f"filled={self.num_filled}, hits={self.hits}, misses={self.misses})"
        )


def _split_batch(batch: Any, key: str | int) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        if key not in batch:
            raise KeyError(f"batch has no key column {key!r}; got columns {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != key}
        return batch[key], inputs
    if isinstance(batch, (tuple, list)) and isinstance(key, int):
        return batch[key], batch[0]
    raise TypeError(f"batches must be dicts (key = column name) or tuples (key = position); got {type(batch).__name__}")


_LABEL_COLUMNS = ("labels", "label", "label_ids")


def _lora_reference(model: nn.Module, inputs: Any) -> Tensor:
    """``F`` of an ``NMTuneLoraModel``: its features with the adapter disabled, in eval mode."""
    inner = _unwrap(model)
    if not _is_lora_model(inner):
        raise TypeError(
            f"precompute computes F itself only for an NMTuneLoraModel; for {type(inner).__name__} pass "
            "features_fn=lambda model, inputs: ..."
        )
    was_training = inner.training
    inner.eval()
    try:
        with inner.peft_model.disable_adapter():
            if isinstance(inputs, Mapping):  # the model takes no labels: they are the loss's
                out = inner(**{k: v for k, v in inputs.items() if k not in _LABEL_COLUMNS}, compute_reference=False)
            else:
                out = inner(inputs, compute_reference=False)
    finally:
        inner.train(was_training)
    return out.features
