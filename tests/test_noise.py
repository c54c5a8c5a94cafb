"""Label-noise injection: exact counts, no self-flips, determinism, subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtune.noise import asymmetric_noise, pair_flip_noise, swap_pairs, symmetric_noise

_settings = settings(max_examples=40, deadline=None)


@_settings
@given(
    n=st.integers(0, 300),
    k=st.integers(2, 12),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_symmetric_exact_count_and_never_same_class(n, k, ratio, seed):
    y = torch.arange(n) % k
    out = symmetric_noise(y, ratio, num_classes=k, seed=seed)
    assert int(out.mask.sum()) == round(ratio * n)
    assert torch.equal(out.labels[~out.mask], y[~out.mask])
    assert bool((out.labels[out.mask] != y[out.mask]).all())
    assert bool(((out.labels >= 0) & (out.labels < k)).all())


def test_symmetric_is_uniform_over_other_classes():
    y = torch.zeros(20000, dtype=torch.long)
    out = symmetric_noise(y, 1.0, num_classes=5, seed=3)
    counts = torch.bincount(out.labels, minlength=5).double()
    assert counts[0] == 0
    assert torch.allclose(counts[1:] / 20000, torch.full((4,), 0.25, dtype=torch.double), atol=0.02)


def test_symmetric_determinism_and_input_types():
    y = np.random.default_rng(0).integers(0, 7, size=500)
    a = symmetric_noise(y, 0.2, seed=11)
    b = symmetric_noise(torch.as_tensor(y), 0.2, seed=torch.Generator().manual_seed(11))
    c = symmetric_noise(list(y), 0.2, seed=12)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert a.labels.dtype == torch.long


@_settings
@given(n=st.integers(0, 200), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       subset=st.sets(st.integers(0, 9), min_size=2, max_size=6))
def test_asymmetric_stays_inside_subset(n, ratio, seed, subset):
    y = torch.arange(n) % 10
    out = asymmetric_noise(y, ratio, classes=sorted(subset), seed=seed)
    inside = torch.isin(y, torch.tensor(sorted(subset)))
    assert int(out.mask.sum()) == round(ratio * int(inside.sum()))
    assert not bool((out.mask & ~inside).any())
    assert torch.isin(out.labels[out.mask], torch.tensor(sorted(subset))).all()
    assert bool((out.labels[out.mask] != y[out.mask]).all())
    assert torch.equal(out.labels[~out.mask], y[~out.mask])


def test_pair_flip_mapping_and_default():
    y = torch.arange(100) % 4
    out = pair_flip_noise(y, 0.5, mapping={0: 3, 2: 1}, seed=0)
    assert int(out.mask.sum()) == 25
    assert torch.equal(out.labels[out.mask & (y == 0)], torch.full(((out.mask & (y == 0)).sum(),), 3))
    assert torch.equal(out.labels[out.mask & (y == 2)], torch.full(((out.mask & (y == 2)).sum(),), 1))
    assert not bool(out.mask[(y == 1) | (y == 3)].any())
    d = pair_flip_noise(y, 1.0, num_classes=4, seed=0)
    assert torch.equal(d.labels, (y + 1) % 4)


@_settings
@given(n=st.integers(0, 300), ratio=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_swap_pairs_is_a_derangement_of_the_chosen(n, ratio, seed):
    if round(ratio * n) == 1:
        with pytest.raises(ValueError, match="at least 2"):
            swap_pairs(n, ratio, seed=seed)
        return
    out = swap_pairs(n, ratio, seed=seed)
    assert int(out.mask.sum()) == round(ratio * n)
    assert sorted(out.labels.tolist()) == list(range(n))  # a permutation
    idx = torch.arange(n)
    assert bool((out.labels[out.mask] != idx[out.mask]).all())
    assert torch.equal(out.labels[~out.mask], idx[~out.mask])


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: symmetric_noise([0, 1], 1.5), ValueError, "ratio"),
        (lambda: symmetric_noise([[0, 1]], 0.1), ValueError, "1-D"),
        (lambda: symmetric_noise([0.5, 1.0], 0.1), TypeError, "integers"),
        (lambda: symmetric_noise([0, -1], 0.1), ValueError, ">= 0"),
        (lambda: symmetric_noise([0, 3], 0.5, num_classes=2), ValueError, "num_classes=2"),
        (lambda: symmetric_noise([0, 0], 1.0, num_classes=1), ValueError, "at least 2"),
        (lambda: symmetric_noise([0, 1], 0.5, seed="x"), TypeError, "seed"),
        (lambda: asymmetric_noise([0, 1], 0.5, classes=[1]), ValueError, "at least 2"),
        (lambda: pair_flip_noise([0, 1], 0.5, mapping={1: 1}), ValueError, "different"),
        (lambda: swap_pairs(-1, 0.5), ValueError, "num_pairs"),
    ],
)
def test_bad_input_messages(call, err, match):
    with pytest.raises(err, match=match):
        call()
