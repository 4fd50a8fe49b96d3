"""Cross-Iteration Batch Normalization's compensated statistics (Yao et al., CVPR 2021;
docs/methods.md, section "cbn")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: One past iteration: ``(mu, meanx2, dmu/dW, dmeanx2/dW, W)``, detached; ``mu``/``meanx2`` ``(C,)``,
#: the others in the shape of the convolution's weight ``(C, *)``.
PastStatistics = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def compensate(past: PastStatistics, weight: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """The statistics of a past iteration moved to the current weights to first order::

        mu_j(W)     ≈ mu_j     + rho · Σ_{i} dmu_j/dW[c,i]     · (W[c,i] − W_j[c,i])
        meanx2_j(W) ≈ meanx2_j + rho · Σ_{i} dmeanx2_j/dW[c,i] · (W[c,i] − W_j[c,i])

    (per output channel ``c``; channel ``c`` of a convolution's output depends on ``W[c]`` only).
    """
    mu, meanx2, dmu, dmeanx2, old_weight = past
    delta = weight.detach().to(dmu.dtype) - old_weight
    dims = tuple(range(1, delta.dim()))
    return mu + rho * (dmu * delta).sum(dims), meanx2 + rho * (dmeanx2 * delta).sum(dims)


def cross_iteration_statistics(
    mu: Tensor, meanx2: Tensor, history: Sequence[PastStatistics], weight: Tensor, rho: float
) -> tuple[Tensor, Tensor]:
    """Mean and biased variance ``(C,)`` over the current and the compensated past iterations::

        mu_bar  = avg_j mu_j(W),   var = max(avg_j meanx2_j(W) − mu_bar², 0)

    over the iterations ``j`` whose compensated variance ``meanx2_j(W) − mu_j(W)²`` is ``≥ 0`` (the
    current one always counts). Gradients flow through the current ``mu``/``meanx2`` only.
    """
    compensated = [compensate(past, weight, rho) for past in history]
    mus = torch.stack([mu, *(m.to(mu.dtype) for m, _ in compensated)])
    meanx2s = torch.stack([meanx2, *(q.to(mu.dtype) for _, q in compensated)])
    valid = meanx2s - mus.square() >= 0
    valid[0] = True
    count = valid.sum(dim=0)
    mu_bar = torch.where(valid, mus, torch.zeros_like(mus)).sum(dim=0) / count
    meanx2_bar = torch.where(valid, meanx2s, torch.zeros_like(meanx2s)).sum(dim=0) / count
    return mu_bar, (meanx2_bar - mu_bar.square()).clamp_min(0.0)
