"""Filter Response Normalization with its thresholded linear unit (docs/methods.md, section "frn")."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import NormInput


def filter_response_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    tau: Tensor | None,
    eps: float | Tensor,
) -> Tensor:
    """FRN + TLU of ``x (N, C, *spatial)`` (Singh & Krishnan, CVPR 2020)::

        nu2[n,c] = 1/S · Σ_s x[n,c,s]²            (x[n,c]² itself for an (N, C) input)
        y        = gamma_c · x / sqrt(nu2 + eps) + beta_c
        z        = max(y, tau_c)                    (TLU; skipped when ``tau`` is None)

    Args:
        x: ``(N, C)`` to ``(N, C, D, H, W)``.
        weight, bias: ``(C,)`` or ``None`` (no affine).
        tau: the TLU threshold ``(C,)`` or ``None``.
        eps: a positive float, or a 0-d tensor (the learned ``eps`` of the layer, already made positive).

    Returns:
        ``z`` in ``x``'s shape, dtype and memory format (computed in float32 for float16/bfloat16).
    """
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    if isinstance(eps, Tensor) and eps.dtype != inp.dtype:
        eps = eps.to(inp.dtype)
    nu2 = x3.square().mean(dim=2, keepdim=True)
    y = x3 * torch.rsqrt(nu2 + eps)
    if inp.weight is not None:
        y = y * inp.weight.view(1, -1, 1) + inp.bias.view(1, -1, 1)
    if tau is not None:
        y = torch.maximum(y, tau.to(inp.dtype).view(1, -1, 1))
    return inp.output(y)
