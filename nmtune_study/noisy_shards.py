"""Noisy image-text pairs: swap the captions of a fraction gamma of the pairs.

The contrastive regime of the paper pre-trains CLIP on data where gamma of the
image-text pairs carry another image's caption. This tool makes such noisy copies
with :func:`nmtune.noise.swap_pairs` (a derangement of the chosen pairs, so no
swapped image keeps its own caption), either

* of an in-memory list of ``(image, caption)`` pairs (:func:`swap_captions`), or
* of webdataset tar shards (``NNN.jpg`` + ``NNN.txt`` per sample, the layout
  ``open_clip_train`` reads and CC12M / YFCC15M subsets are distributed in),
  streaming (:func:`noisy_shards`).

Shards are processed in *blocks* of consecutive shards holding at most ``buffer``
pairs; captions are swapped inside a block, so memory holds at most ``buffer``
captions (images are copied member by member, never held). The number of swapped
pairs over the whole dataset is exactly ``round(gamma * N)``: it is split over the
blocks by largest remainder. Everything is determined by ``seed``; each output shard
is written atomically with a per-shard manifest (``NAME.manifest.json``: which key
got which key's caption), so an interrupted run resumes shard by shard. A shard
that is not a readable tar, has a sample without caption or image, or repeats a
key raises :class:`MalformedShardError` naming the shard and the sample.

Command line::

    python examples/noisy_shards.py --input '/data/cc12m/{00000..01242}.tar' \\
        --out /data/cc12m-noisy/g10 --gamma 0.10 --seed 0
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pathlib
import re
import tarfile
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nmtune._validation import check_int
from nmtune.noise import swap_pairs

__all__ = ["MalformedShardError", "swap_captions", "read_captions", "allocate_swaps", "noisy_shards",
           "expand_shards", "main", "parser", "run"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset: key = path up to the first dot of the basename


class MalformedShardError(ValueError):
    """A shard is not a webdataset tar of ``KEY.<image>`` + ``KEY.txt`` samples."""


def swap_captions(pairs: Sequence[tuple[Any, str]], gamma: float, *, seed: int = 0
                  ) -> tuple[list[tuple[Any, str]], dict[str, Any]]:
    """Swap the captions of exactly ``round(gamma * len(pairs))`` in-memory pairs.

    Args:
        pairs: ``(image, caption)`` pairs (images are passed through untouched).
        gamma: fraction of pairs whose caption is replaced, in ``[0, 1]``.
        seed: seed of the swap.

    Returns:
        ``(noisy_pairs, manifest)``; ``manifest["swaps"]`` lists ``[i, j]``: image
        ``i`` now carries the caption of pair ``j`` (``j != i``).

    Example:
        >>> pairs = [(i, f"caption {i}") for i in range(10)]
        >>> noisy, man = swap_captions(pairs, 0.3, seed=0)
        >>> man["num_swapped"], all(noisy[i][1] != pairs[i][1] for i, _ in man["swaps"])
        (3, True)
    """
    swap = swap_pairs(len(pairs), gamma, seed=seed)
    src = swap.labels.tolist()
    noisy = [(img, pairs[src[i]][1]) for i, (img, _) in enumerate(pairs)]
    swaps = [[i, src[i]] for i in torch.nonzero(swap.mask).flatten().tolist()]
    return noisy, {"gamma": gamma, "seed": seed, "num_pairs": len(pairs), "num_swapped": len(swaps), "swaps": swaps}


# ----------------------------------------------------------------------------- reading shards


def _members(path: pathlib.Path) -> Iterator[tuple[tarfile.TarInfo, str, str, tarfile.TarFile]]:
    """Stream ``(info, key, ext, tar)`` over a shard's files, validating names."""
    try:
        tar = tarfile.open(path, "r|*")
    except (tarfile.TarError, OSError) as err:
        raise MalformedShardError(f"{path}: not a readable tar file ({err})") from err
    with tar:
        try:
            for info in tar:
                if info.isdir():
                    continue
                if not info.isfile():
                    raise MalformedShardError(f"{path}: member {info.name!r} is not a regular file")
                m = _KEY_RE.match(info.name)
                if m is None:
                    raise MalformedShardError(f"{path}: member {info.name!r} has no KEY.EXT name")
                yield info, m.group(1), m.group(2).lower(), tar
        except (tarfile.TarError, EOFError, OSError) as err:
            raise MalformedShardError(f"{path}: truncated or corrupt tar ({err})") from err


def _samples(path: pathlib.Path, *, with_bytes: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """Group a shard's members by key: ``(key, {ext: (info, bytes or None)})``; checks each
    sample has one caption and one image and that keys are contiguous and unique."""
    seen: set[str] = set()
    key, files = None, {}

    def finish():
        if TEXT_EXT not in files:
            raise MalformedShardError(f"{path}: sample {key!r} has no .{TEXT_EXT} caption (has {sorted(files)})")
        if not any(e in files for e in IMAGE_EXTS):
            raise MalformedShardError(
                f"{path}: sample {key!r} has no image ({'/'.join(IMAGE_EXTS)}; has {sorted(files)})")
        return key, files

    for info, k, ext, tar in _members(path):
        if k != key:
            if key is not None:
                yield finish()
            if k in seen:
                raise MalformedShardError(f"{path}: key {k!r} appears twice (samples must be contiguous and unique)")
            seen.add(k)
            key, files = k, {}
        if ext in files:
            raise MalformedShardError(f"{path}: sample {k!r} has two .{ext} files")
        data = tar.extractfile(info).read() if (with_bytes or ext == TEXT_EXT) else None
        files[ext] = (info, data)
    if key is not None:
        yield finish()


def _caption(path: pathlib.Path, key: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MalformedShardError(f"{path}: caption of {key!r} is not UTF-8 ({err})") from err


def read_captions(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(key, caption)`` of every sample of one shard, in order (images are skipped).

    Example:
        >>> read_captions("missing.tar")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        MalformedShardError: missing.tar: not a readable tar file
    """
    path = pathlib.Path(path)
    return [(k, _caption(path, k, files[TEXT_EXT][1])) for k, files in _samples(path, with_bytes=False)]


# ----------------------------------------------------------------------------- the plan


def _blocks(counts: Sequence[int], buffer: int, names: Sequence[str]) -> list[list[int]]:
    blocks: list[list[int]] = []
    size = 0
    for i, n in enumerate(counts):
        if n > buffer:
            raise ValueError(f"shard {names[i]} has {n} pairs, more than buffer={buffer}; raise --buffer")
        if blocks and size + n <= buffer:
            blocks[-1].append(i)
            size += n
        else:
            blocks.append([i])
            size = n
    return blocks


def allocate_swaps(sizes: Sequence[int], gamma: float) -> list[int]:
    """Split ``round(gamma * sum(sizes))`` swaps over blocks of the given sizes: largest
    remainder of ``gamma * size``, then no block left with exactly one swap (a single
    pair cannot be swapped).

    Example:
        >>> allocate_swaps([10, 10, 10], 0.05)   # 1.5 -> 2 swaps, never 1 per block
        [2, 0, 0]
    """
    total = int(round(gamma * sum(sizes)))
    quota = [gamma * n for n in sizes]
    counts = [int(np.floor(q)) for q in quota]
    order = sorted(range(len(sizes)), key=lambda b: (-(quota[b] - counts[b]), b))
    for b in order[: total - sum(counts)]:
        counts[b] += 1
    ones = [b for b, c in enumerate(counts) if c == 1]
    while len(ones) >= 2:  # merge two single swaps into one block that has room for both
        a, b = sorted(ones[:2], key=lambda i: (-sizes[i], i))
        if sizes[a] < 2:
            break
        counts[a], counts[b] = 2, 0
        ones = ones[2:]
    for b in [b for b, c in enumerate(counts) if c == 1]:
        room = [o for o, c in enumerate(counts) if o != b and c >= 2 and c < sizes[o]]
        if room:
            counts[b], counts[room[0]] = 0, counts[room[0]] + 1
            continue
        spare = [o for o, c in enumerate(counts) if o != b and c >= 3]
        if spare and sizes[b] >= 2:  # take one from a block with 3+ swaps: this block gets 2
            counts[b], counts[spare[0]] = 2, counts[spare[0]] - 1
            continue
        raise ValueError(f"cannot swap exactly {total} of {sum(sizes)} pairs in blocks of {list(sizes)} "
                             "(a lone swap has no partner); use a larger buffer or another gamma")
    return counts


def _block_seed(seed: int, block: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(block)]).generate_state(1)[0])


def expand_shards(specs: Sequence[str]) -> list[pathlib.Path]:
    """Paths from literal names, globs and webdataset brace ranges (``{000..009}``)."""
    out: list[pathlib.Path] = []
    for spec in specs:
        for s in _braces(spec):
            hits = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
            out += [pathlib.Path(h) for h in hits]
    return out


def _braces(spec: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m is None:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [x for i in range(lo, hi + 1) for x in _braces(spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():])]


# ----------------------------------------------------------------------------- writing


def _plan(shards: list[pathlib.Path], out: pathlib.Path, gamma: float, seed: int, buffer: int) -> dict[str, Any]:
    """Count pairs per shard and split the swaps over blocks (cached in ``plan.json``)."""
    names = [p.name for p in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"shard file names must be unique (outputs keep them); got {names}")
    head = {"gamma": gamma, "seed": seed, "buffer": buffer, "shards": [str(p) for p in shards]}
    plan_file = out / "plan.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        if {k: plan.get(k) for k in head} != head:
            raise ValueError(f"{plan_file} was written for {({k: plan.get(k) for k in head})}, not {head}; "
                             "use another --out")
        return plan
    counts = [len(read_captions(p)) for p in shards]
    blocks = _blocks(counts, buffer, names)
    swaps = allocate_swaps([sum(counts[i] for i in b) for b in blocks], gamma)
    plan = {**head, "counts": counts, "blocks": blocks, "block_swaps": swaps,
            "num_pairs": sum(counts), "num_swapped": sum(swaps)}
    _write_json(plan_file, plan)
    return plan


def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _write_shard(src: pathlib.Path, dst: pathlib.Path, new_captions: dict[str, str]) -> None:
    """Copy ``src`` to ``dst`` member by member, replacing the captions of ``new_captions``."""
    tmp = dst.with_name(dst.name + ".tmp")
    with tarfile.open(tmp, "w") as out:
        for key, files in _samples(src, with_bytes=True):
            for ext, (info, data) in files.items():
                if ext == TEXT_EXT and key in new_captions:
                    data = new_captions[key].encode("utf-8")
                info = tarfile.TarInfo(info.name) if ext == TEXT_EXT else info
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    os.replace(tmp, dst)


def noisy_shards(shards: Sequence[str | os.PathLike], out_dir: str | os.PathLike, gamma: float, *,
                 seed: int = 0, buffer: int = 100_000) -> dict[str, Any]:
    """Write noisy copies of webdataset shards: ``round(gamma * N)`` pairs get another
    pair's caption (see the module docstring).

    Args:
        shards: input tar shards (output files keep their names).
        out_dir: output folder: the shards, ``NAME.manifest.json`` per shard, ``plan.json``
            and ``manifest.json`` (summary).
        gamma: fraction of swapped pairs in ``[0, 1]``.
        seed: seed of the swap.
        buffer: most captions held in memory; a block of shards swaps inside itself.

    Returns:
        The summary manifest (``num_pairs``, ``num_swapped``, ``swapped_per_shard``,
        ``max_buffered``: the most captions held at once, ``written``: shards written
        by this call).

    Example:
        >>> noisy_shards(["missing.tar"], "/tmp/noisy", 0.1)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        MalformedShardError: missing.tar: not a readable tar file
    """
    shards = [pathlib.Path(p) for p in shards]
    if not shards:
        raise ValueError("no input shards given")
    buffer = check_int("buffer", buffer, minimum=2)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(shards, out, float(gamma), int(seed), buffer)
    written, max_buffered = [], 0
    for b, (block, n_swap) in enumerate(zip(plan["blocks"], plan["block_swaps"])):
        todo = [i for i in block if not (out / f"{shards[i].name}.manifest.json").exists()]
        if not todo:
            continue
        pairs = [(i, key, cap) for i in block for key, cap in read_captions(shards[i])]
        max_buffered = max(max_buffered, len(pairs))
        n = len(pairs)
        swap = swap_pairs(n, n_swap / n if n else 0.0, seed=_block_seed(seed, b))
        if int(swap.mask.sum()) != n_swap:  # pragma: no cover - guards the float round trip
            raise RuntimeError(f"block {b}: swapped {int(swap.mask.sum())} pairs, planned {n_swap}")
        src = swap.labels.tolist()
        for i in todo:
            swapped = [(key, pairs[src[j]]) for j, (s, key, _) in enumerate(pairs) if s == i and src[j] != j]
            _write_shard(shards[i], out / shards[i].name, {key: p[2] for key, p in swapped})
            _write_json(out / f"{shards[i].name}.manifest.json", {
                "shard": shards[i].name, "num_pairs": plan["counts"][i], "num_swapped": len(swapped),
                "swaps": [{"key": key, "caption_from_shard": shards[p[0]].name, "caption_from_key": p[1]}
                          for key, p in swapped]})
            written.append(shards[i].name)
        del pairs
    per_shard = {p.name: json.loads((out / f"{p.name}.manifest.json").read_text())["num_swapped"] for p in shards}
    summary = {"gamma": plan["gamma"], "seed": plan["seed"], "num_pairs": plan["num_pairs"],
               "num_swapped": sum(per_shard.values()), "swapped_per_shard": per_shard,
               "shards": [p.name for p in shards]}
    _write_json(out / "manifest.json", summary)
    return {**summary, "max_buffered": max_buffered, "written": written}



def parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="shards: paths, globs or {000..099} ranges")
    p.add_argument("--out", required=True)
    p.add_argument("--gamma", type=float, required=True, help="fraction of swapped pairs, e.g. 0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buffer", type=int, default=100_000, help="most captions held in memory")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    return noisy_shards(expand_shards(a.input), a.out, a.gamma, seed=a.seed, buffer=a.buffer)


def main(argv: list[str] | None = None) -> int:
    """``python examples/noisy_shards.py``, ``python -m nmtune_study.noisy_shards``: :func:`run`, then print
    its summary; exit status 0."""
    res = run(argv)
    print(json.dumps({k: v for k, v in res.items() if k != "swapped_per_shard"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
