"""Inference example weighing (Summers & Dinneen, "Four Things"; docs/methods.md, section
"Inference example weighing"): the population moments mixed with each example's own, shared by
bn, ghost (through :func:`~.batch_norm.batch_norm`) and gbgn."""

from __future__ import annotations

import torch
from torch import Tensor


def example_weighted_norm(
    x3: Tensor,
    pop_mean: Tensor,
    pop_ex2: Tensor,
    alpha: float,
    eps: float,
) -> Tensor:
    """Inference example weighing (Summers & Dinneen, "Four Things"; docs/methods.md, section
    "Inference example weighing").

    ``x3``: ``(N, K, L)``; per ``(n, k)`` the example's own moments over ``L`` are mixed with
    the population moments ``pop_mean``/``pop_ex2`` (shape ``(K,)``, ``pop_ex2 = E_pop[x^2]``):
    ``mu = (1-a) mu_pop + a mu_ex``, ``s = (1-a) E_pop[x^2] + a E_ex[x^2]``,
    ``var = max(s - mu^2, 0)``; returns ``(x - mu) / sqrt(var + eps)`` (no affine).
    """
    mu_ex = x3.mean(dim=2, keepdim=True)
    ex2_ex = (x3 * x3).mean(dim=2, keepdim=True)
    mu = (1.0 - alpha) * pop_mean.view(1, -1, 1) + alpha * mu_ex
    s = (1.0 - alpha) * pop_ex2.view(1, -1, 1) + alpha * ex2_ex
    var = (s - mu * mu).clamp_min(0.0)
    return (x3 - mu) * torch.rsqrt(var + eps)
