"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020; docs/methods.md, sections
"evonorm_b0" and "evonorm_s0")."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import NormInput, spatial_size
from .moments import check_set_size, row_moments, update_running_stats


def _affine(y: Tensor, inp: NormInput) -> Tensor:
    if inp.weight is None:
        return y
    return y * inp.weight.view(1, -1, 1) + inp.bias.view(1, -1, 1)


def evonorm_b0(
    x: Tensor,
    v: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    factor: float,
    eps: float,
) -> Tensor:
    """EvoNorm-B0 of ``x (N, C, *spatial)`` with at least one spatial dim::

        var_b[c]   = biased variance of x[:, c, :] over (N, S)   (training; running_var at inference)
        var_i[n,c] = biased variance of x[n, c, :] over S
        y = gamma_c · x / max(sqrt(var_b + eps), v_c · x + sqrt(var_i + eps)) + beta_c

    In training the gradient flows through ``var_b`` and, when ``factor > 0``, ``running_var`` is
    updated in place with PyTorch's rule (``(1-f) r + f · var_b · n/(n-1)``, ``n = N·S``).

    Args:
        v: ``(C,)``, the learned per-channel slope of the instance term.
        running_var: ``(C,)`` (required at inference), or ``None`` in training without tracking.
        weight, bias: ``(C,)`` or ``None``.
    """
    if training:
        fix = "use more than one position per channel map, or another method"
        check_set_size(spatial_size(x), "EvoNormB0's instance variance", fix)
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    if training:
        mean_b = x3.mean(dim=(0, 2), keepdim=True)
        var_b = (x3 - mean_b).square().mean(dim=(0, 2), keepdim=True)
        if running_var is not None and factor:
            update_running_stats(None, running_var, mean_b.detach(), var_b.detach(), x3.shape[0] * x3.shape[2], factor)
    else:
        var_b = running_var.to(inp.dtype).view(1, -1, 1)
    _, var_i = row_moments(x3)
    denominator = torch.maximum(torch.sqrt(var_b + eps), x3 * v.to(inp.dtype).view(1, -1, 1) + torch.sqrt(var_i + eps))
    return inp.output(_affine(x3 / denominator, inp))


def evonorm_s0(
    x: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    num_groups: int,
    eps: float,
    training: bool = False,
) -> Tensor:
    """EvoNorm-S0 of ``x (N, C, *spatial)``, ``num_groups`` = ``G`` dividing ``C``::

        var_g[n,g] = biased variance of x[n, c in g, :] over (C/G, S)   (GN's sets)
        y = gamma_c · x · sigmoid(v_c · x) / sqrt(var_g + eps) + beta_c

    The same computation in training and at inference (no running statistics); ``training`` only
    turns on the check that a set holds more than one value.
    """
    if training:
        size = (x.shape[1] // num_groups) * spatial_size(x)
        check_set_size(size, "EvoNormS0", "use fewer groups (num_groups) or inputs with more positions")
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    n, c, s = x3.shape
    groups = x3.reshape(n, num_groups, (c // num_groups) * s)
    # the variance of each set minus its first value (detached; a variance is shift-invariant): a float32 set of
    # equal values then has exactly 0 variance and gradient, as in exact arithmetic (docs/methods.md, "Precision")
    _, var_g = row_moments(groups - groups.detach()[:, :, :1])
    std = torch.sqrt(var_g + eps).repeat_interleave(c // num_groups, dim=1)  # (N, C, 1)
    gate = torch.sigmoid(x3 * v.to(inp.dtype).view(1, -1, 1))
    return inp.output(_affine(x3 * gate / std, inp))
