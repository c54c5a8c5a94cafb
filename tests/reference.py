"""Slow, obviously-correct references straight from the paper's equations.

float64, full ``torch.linalg.svd`` / ``svdvals``, explicit ``D x D`` covariance
with an off-diagonal mask. Used only by the tests and the benchmarks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _per_matrix(fn, z: Tensor, *args) -> Tensor:
    if z.dim() == 2:
        return fn(z, *args)
    flat = z.reshape(-1, *z.shape[-2:])
    return torch.stack([fn(m, *args) for m in flat]).reshape(z.shape[:-2])


def covariance(z: Tensor) -> Tensor:
    def one(m: Tensor) -> Tensor:
        n, d = m.shape
        zc = m - m.mean(dim=0, keepdim=True)
        c = zc.T @ zc / (n - 1)
        off = ~torch.eye(d, dtype=torch.bool, device=m.device)
        return (c[off] ** 2).sum() / d

    return _per_matrix(one, z.double())


def singular_values(z: Tensor) -> Tensor:
    return torch.linalg.svd(z.double(), full_matrices=False).S


def ratio(z: Tensor, top_k: int = 1) -> Tensor:
    s = singular_values(z)
    return -(s[..., :top_k].sum(-1) / s.sum(-1)) / top_k


def sve(z: Tensor) -> Tensor:
    s = singular_values(z)
    p = s / s.sum(-1, keepdim=True)
    return -(p * torch.log(p)).sum(-1)


def lsvr(z: Tensor) -> Tensor:
    s = singular_values(z)
    return -torch.log(s[..., 0] / s.sum(-1))


def consistency(z: Tensor, f: Tensor) -> Tensor:
    zn = z.double() / z.double().norm(dim=-1, keepdim=True)
    fn = f.double() / f.double().norm(dim=-1, keepdim=True)
    return ((fn - zn) ** 2).sum(-1).mean()


def regularizer(z: Tensor, f: Tensor, *, lam=0.01, w=(1.0, 1.0, 1.0), top_k=1) -> Tensor:
    return lam * (
        w[0] * consistency(z, f) + w[1] * covariance(z).mean() + w[2] * ratio(z, top_k).mean()
    )
