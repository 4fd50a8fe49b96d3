"""Normalizations of a layer's weight rather than its activations (docs/methods.md, section
"Parameter normalizations")."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import upcast


def weight_standardize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Weight standardization (Qiao et al. 2019): per output unit over all other axes.

    ``w_hat[o] = (w[o] - mean(w[o])) / sqrt(var(w[o]) + eps)`` (biased variance); for a conv
    weight ``(O, I, kh, kw)`` the set is ``(I, kh, kw)``; for a linear weight ``(O, I)`` it is ``I``.
    """
    dims = tuple(range(1, weight.dim()))
    wc = upcast(weight)
    var, mean = torch.var_mean(wc, dim=dims, correction=0, keepdim=True)
    return ((wc - mean) * torch.rsqrt(var + eps)).to(weight.dtype)
