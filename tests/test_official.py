"""The "official" preset against a float64 transcription of the authors' training step.

``authors_loss`` below is written from the loss block of their released
``nml_tune.py`` (Hhhhhhao/Noisy-Model-Learning): two views ``cat([weak, strong])`` through
the MLP, cross-entropy on all ``2B`` rows, ``nn.MSELoss`` between the row-normalised strong
``Z`` and the row-normalised detached weak ``F``, minus ``0.001`` times the mean of the top-5
normalised singular values of the uncentred ``Z`` (all ``2B`` rows, however many exist), and
``0.04`` times the off-diagonal covariance energy of the centred ``Z`` over ``D``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nmtune import NMTuneHead, NMTuneLoss


def authors_loss(logits: torch.Tensor, labels: torch.Tensor, z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    b = z.shape[0] // 2
    z_strong, f_weak = z[b:], f[:b]
    loss = F.cross_entropy(logits, torch.cat([labels, labels]))
    loss = loss + 1.0 * F.mse_loss(F.normalize(z_strong, dim=1), F.normalize(f_weak.detach(), dim=1))
    s = torch.linalg.svdvals(z)
    s = s / s.sum()
    loss = loss - 0.001 * s[:5].mean()
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (z.shape[0] - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return loss + 0.04 * off.pow(2).sum() / z.shape[1]


def _step(b: int, d: int = 12, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2 * b, d, generator=g, dtype=torch.float64)  # cat([F_weak, F_strong])
    z = (f + 0.3 * torch.randn(2 * b, d, generator=g, dtype=torch.float64)).requires_grad_(True)
    logits = torch.randn(2 * b, c, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, labels, z, f


@pytest.mark.parametrize("b", [2, 8, 32])
def test_two_view_step_matches_the_authors(b: int) -> None:
    logits, labels, z, f = _step(b)
    ours = NMTuneLoss("official")(logits, torch.cat([labels, labels]), z, f, views=2)
    theirs = authors_loss(logits, labels, z, f)
    g_ours = torch.autograd.grad(ours, (z, logits))
    g_theirs = torch.autograd.grad(theirs, (z, logits))
    assert abs(float(ours - theirs)) <= 1e-10 * abs(float(theirs))
    for a, t in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)


def test_default_call_is_not_the_authors_step() -> None:
    # Without views=2, L_MSE pairs Z_weak with F_weak and Z_strong with F_strong: a different loss.
    logits, labels, z, f = _step(8)
    plain = NMTuneLoss("official")(logits, torch.cat([labels, labels]), z, f)
    assert abs(float(plain - authors_loss(logits, labels, z, f))) > 1e-6


def test_cached_features_match_their_duplicated_batch() -> None:
    # One cached F per image: their code would see cat(F, F) and, with no augmentation, Z twice.
    # Passing the duplicated batch with views=2 reproduces them exactly; the plain call on the
    # B rows differs only in L_COV, by the factor ((2B - 2) / (2B - 1))^2.
    b, d = 8, 12
    g = torch.Generator().manual_seed(1)
    f = torch.randn(b, d, generator=g, dtype=torch.float64)
    z = f + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)
    logits, labels = torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (b,), generator=g)
    dup = NMTuneLoss("official")(torch.cat([logits, logits]), torch.cat([labels, labels]), torch.cat([z, z]),
                                 torch.cat([f, f]), views=2, return_components=True)
    theirs = authors_loss(torch.cat([logits, logits]), labels, torch.cat([z, z]), torch.cat([f, f]))
    assert abs(float(dup.loss - theirs)) <= 1e-10 * abs(float(theirs))
    single = NMTuneLoss("official")(logits, labels, z, f, return_components=True)
    for name in ("task", "consistency", "singular_value"):
        torch.testing.assert_close(getattr(single, name), getattr(dup, name), rtol=1e-12, atol=1e-14)
    factor = ((2 * b - 2) / (2 * b - 1)) ** 2
    torch.testing.assert_close(dup.covariance, single.covariance * factor, rtol=1e-12, atol=0)


def test_official_top_k_averages_what_exists() -> None:
    # 2 rows, top_k = 5: the authors' torch.mean(s[:5]) averages the two singular values.
    logits, labels, z, f = _step(1)
    ours = NMTuneLoss("official")(logits, torch.cat([labels, labels]), z, f, views=2)
    torch.testing.assert_close(ours, authors_loss(logits, labels, z, f), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, min\(M, D\)\] = \[1, 2\]"):
        NMTuneLoss("paper", top_k=5)(logits, torch.cat([labels, labels]), z, f)


def test_views_validation() -> None:
    logits, labels, z, f = _step(4)
    with pytest.raises(ValueError, match="views must be one of"):
        NMTuneLoss("official")(logits, torch.cat([labels, labels]), z, f, views=3)
    with pytest.raises(ValueError, match="even number of rows"):
        NMTuneLoss("official")(logits[:7], torch.cat([labels, labels])[:7], z[:7], f[:7], views=2)


def test_official_head_classifier_init() -> None:
    torch.manual_seed(0)
    head = NMTuneHead.from_preset("official", 64, 10)
    w, bias = head.classifier.weight, head.classifier.bias
    assert float(bias.abs().max()) == 0.0
    bound = math.sqrt(6 / 64)  # kaiming_uniform_ with a = 0
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    paper = NMTuneHead.from_preset("paper", 64, 10)
    assert float(paper.classifier.weight.abs().max()) <= 1 / 8 and float(paper.classifier.bias.abs().max()) > 0
