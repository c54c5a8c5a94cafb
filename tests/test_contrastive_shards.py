"""The noisy-pair tool of the contrastive regime (nmtune_study.noisy_shards, examples/noisy_shards.py)."""

from __future__ import annotations

import io
import pathlib
import tarfile
import tracemalloc

import pytest

from nmtune_study import noisy_shards as ns


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: pathlib.Path, n_shards: int, per_shard: int, *, image_bytes: int = 2000,
                 jpeg: bool = False) -> list[pathlib.Path]:
    """Shards of ``KEY.jpg`` + ``KEY.txt`` with unique captions (random bytes or real JPEGs)."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:03d}{i:04d}"
                if jpeg:
                    from PIL import Image

                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                    img = buf.getvalue()
                else:
                    img = rng.integers(0, 255, image_bytes, dtype=np.uint8).tobytes()
                _add(tar, f"{key}.jpg", img)
                _add(tar, f"{key}.txt", f"caption of sample {key}".encode())
        paths.append(path)
    return paths


def read_shard(path: pathlib.Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1, 0.2, 0.3])
def test_in_memory_swap_is_exact_deterministic_and_never_keeps_a_caption(gamma):
    pairs = [(f"img{i}", f"cap{i}") for i in range(101)]
    noisy, man = ns.swap_captions(pairs, gamma, seed=3)
    again, _ = ns.swap_captions(pairs, gamma, seed=3)
    changed = [i for i in range(len(pairs)) if noisy[i][1] != pairs[i][1]]
    assert man["num_swapped"] == round(gamma * 101) == len(changed)
    assert sorted(i for i, _ in man["swaps"]) == changed
    assert [p[0] for p in noisy] == [p[0] for p in pairs]  # images untouched
    assert sorted(c for _, c in noisy) == sorted(c for _, c in pairs)  # captions permuted, none lost
    assert noisy == again
    if gamma:
        assert ns.swap_captions(pairs, gamma, seed=4)[0] != noisy


def test_allocation_is_exact_and_never_leaves_a_lone_swap():
    for sizes in ([10, 10, 10], [7, 3, 9, 1, 12], [2] * 8 + [3], [50], [5, 5, 5, 5, 4], [3, 1, 1, 1]):
        for gamma in (0.05, 0.1, 0.2, 0.3, 0.5):
            if round(gamma * sum(sizes)) == 1:  # one pair cannot be swapped with itself
                with pytest.raises(ValueError, match="lone swap"):
                    ns.allocate_swaps(sizes, gamma)
                continue
            counts = ns.allocate_swaps(sizes, gamma)
            assert sum(counts) == round(gamma * sum(sizes)), (sizes, gamma, counts)
            assert all(c != 1 and c <= n for c, n in zip(counts, sizes)), (sizes, gamma, counts)
    with pytest.raises(ValueError, match="lone swap"):  # blocks of 2 can only swap an even number
        ns.allocate_swaps([2] * 9, 5 / 18)


def test_shards_exact_fraction_no_kept_caption_manifest_and_bounded_buffer(tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=10, per_shard=9)
    tracemalloc.start()
    res = ns.noisy_shards(shards, tmp_path / "out", 0.2, seed=0, buffer=20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total_bytes = sum(p.stat().st_size for p in shards)
    assert res["num_pairs"] == 90 and res["num_swapped"] == 18
    assert res["max_buffered"] <= 20  # at most two 9-pair shards at once, never all 90 captions
    assert peak < total_bytes / 2, (peak, total_bytes)  # images are streamed, not held
    changed = 0
    for p in shards:
        before, after = read_shard(p), read_shard(tmp_path / "out" / p.name)
        assert list(before) == list(after)
        assert all(before[k]["jpg"] == after[k]["jpg"] for k in before)
        swapped = {k for k in before if before[k]["txt"] != after[k]["txt"]}
        changed += len(swapped)
        man = ns.json.loads((tmp_path / "out" / f"{p.name}.manifest.json").read_text())
        assert {s["key"] for s in man["swaps"]} == swapped
        for s in man["swaps"]:
            src = read_shard(tmp_path / "in" / s["caption_from_shard"])[s["caption_from_key"]]["txt"]
            assert after[s["key"]]["txt"] == src and s["caption_from_key"] != s["key"]
    assert changed == 18


def test_shards_are_deterministic_and_resume_per_shard(tmp_path):
    shards = write_shards(tmp_path / "in", n_shards=4, per_shard=6)
    ns.noisy_shards(shards, tmp_path / "a", 0.3, seed=1, buffer=12)
    ns.noisy_shards(shards, tmp_path / "b", 0.3, seed=1, buffer=12)
    ns.noisy_shards(shards, tmp_path / "c", 0.3, seed=2, buffer=12)
    same = [(tmp_path / "a" / p.name).read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in shards]
    assert all(same)
    assert any((tmp_path / "a" / p.name).read_bytes() != (tmp_path / "c" / p.name).read_bytes() for p in shards)
    # interrupted after some shards: remove one output and its manifest, rerun
    ref = (tmp_path / "a" / "002.tar").read_bytes()
    (tmp_path / "a" / "002.tar").unlink()
    (tmp_path / "a" / "002.tar.manifest.json").unlink()
    res = ns.noisy_shards(shards, tmp_path / "a", 0.3, seed=1, buffer=12)
    assert res["written"] == ["002.tar"]
    assert (tmp_path / "a" / "002.tar").read_bytes() == ref
    with pytest.raises(ValueError, match="plan.json"):
        ns.noisy_shards(shards, tmp_path / "a", 0.1, seed=1, buffer=12)


def test_malformed_shards_raise_a_clear_error(tmp_path):
    bad = tmp_path / "notatar.tar"
    bad.write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(ns.MalformedShardError, match="notatar.tar: not a readable tar"):
        ns.noisy_shards([bad], tmp_path / "o1", 0.1)
    nocap = tmp_path / "nocap.tar"
    with tarfile.open(nocap, "w") as tar:
        _add(tar, "000.jpg", b"x")
        _add(tar, "000.txt", b"a caption")
        _add(tar, "001.jpg", b"y")
    with pytest.raises(ns.MalformedShardError, match=r"nocap.tar: sample '001' has no \.txt caption"):
        ns.noisy_shards([nocap], tmp_path / "o2", 0.1)
    dup = tmp_path / "dup.tar"
    with tarfile.open(dup, "w") as tar:
        for name in ("000.jpg", "000.txt", "001.jpg", "001.txt", "000.png"):
            _add(tar, name, b"z")
    with pytest.raises(ns.MalformedShardError, match="dup.tar: key '000' appears twice"):
        ns.noisy_shards([dup], tmp_path / "o3", 0.1)
    good = write_shards(tmp_path / "in", n_shards=1, per_shard=4)[0]
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ns.MalformedShardError, match="trunc.tar"):
        ns.noisy_shards([truncated], tmp_path / "o4", 0.5)


def test_cli_expands_brace_ranges(tmp_path):
    write_shards(tmp_path / "in", n_shards=3, per_shard=4)
    res = ns.run(["--input", str(tmp_path / "in" / "{000..002}.tar"), "--out", str(tmp_path / "o"),
                  "--gamma", "0.5", "--seed", "0"])
    assert res["shards"] == ["000.tar", "001.tar", "002.tar"] and res["num_swapped"] == 6
