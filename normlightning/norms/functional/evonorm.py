"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020; docs/methods.md, sections
"evonorm_b0" and "evonorm_s0")."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import squared_deviations
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


def _evonorm_s0_terms(
    x4: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """EvoNorm-S0 on the grouped view ``x4 (N, G, C/G, S)`` (docs/methods.md, section "evonorm_s0").

    Returns ``(y, shifted, mean, rstd, gate, h, scale)``: the output ``y = scale · h + beta`` with
    ``h = x · sigmoid(v x)`` and ``scale = gamma · rstd`` (``rstd`` itself without the affine, ``scale``
    then ``None``); the set's values minus its first one (detached; a variance is shift-invariant: a
    float32 set of equal values then has exactly 0 variance and gradient, as in exact arithmetic,
    docs/methods.md, "Precision") and their mean ``(N, G, 1, 1)``; ``rstd = 1 / sqrt(var_g + eps)``
    ``(N, G, 1, 1)``; ``gate = sigmoid(v x)``.
    """
    n, g, k, _ = x4.shape
    shifted = x4 - x4.detach()[:, :, :1, :1]
    mean = shifted.mean(dim=(2, 3), keepdim=True)
    rstd = torch.rsqrt(squared_deviations(shifted, mean).mean(dim=(2, 3), keepdim=True) + eps)
    gate = torch.sigmoid(x4 * v.view(1, g, k, 1))
    h = x4 * gate
    scale = None if weight is None else rstd * weight.view(1, g, k, 1)  # (N, G, C/G, 1)
    y = h * (rstd if scale is None else scale)
    if bias is not None:
        y = y.add_(bias.view(1, g, k, 1))
    return y, shifted, mean, rstd, gate, h, scale


class _EvoNormS0(torch.autograd.Function):
    """:func:`_evonorm_s0_terms` as one autograd node with a hand-written backward. With ``L = C/G · S``
    the size of a set, ``g_h = dL/dy · scale`` and ``T = g_h · x · sigma'(v x)``::

        A[n,c]      = Σ_s dL/dy · h
        dL/dgamma_c = Σ_n A · rstd,   dL/dbeta_c = Σ_{n,s} dL/dy,   dL/dv_c = Σ_{n,s} T · x
        k[n,g]      = rstd³ · Σ_{c in g} gamma_c A          (−dL/dvar_g · 2)
        dL/dx       = g_h · sigmoid(v x) + v · T − k · (x − mean_g) / L
    """

    @staticmethod
    def forward(ctx, x4, v, weight, bias, eps):
        y, shifted, mean, rstd, gate, h, scale = _evonorm_s0_terms(x4, v, weight, bias, eps)
        ctx.save_for_backward(x4, v, weight, shifted, mean, rstd, gate, h, scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x4, v, weight, shifted, mean, rstd, gate, h, scale = ctx.saved_tensors
        n, g, k, s = x4.shape
        a = (grad_y * h).sum(dim=3, keepdim=True)  # (N, G, C/G, 1)
        grad_weight = (a * rstd).sum(dim=0).view(-1) if weight is not None else None
        grad_bias = grad_y.sum(dim=(0, 3)).view(-1) if ctx.has_bias else None
        a_gamma = a if weight is None else a * weight.view(1, g, k, 1)
        k_var = a_gamma.sum(dim=2, keepdim=True).mul_(rstd.pow(3))  # (N, G, 1, 1)
        grad_h = grad_y * (rstd if scale is None else scale)
        t = torch.ops.aten.sigmoid_backward(grad_h * x4, gate)
        grad_v = (t * x4).sum(dim=(0, 3)).view(-1)
        grad_x = torch.addcmul(grad_h.mul_(gate), t, v.view(1, g, k, 1))
        grad_x.addcmul_(shifted - mean, k_var, value=-1.0 / (k * s))
        return grad_x, grad_v, grad_weight, grad_bias, None


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
    turns on the check that a set holds more than one value. With gradients, one autograd node
    (:class:`_EvoNormS0`).
    """
    if training:
        size = (x.shape[1] // num_groups) * spatial_size(x)
        check_set_size(size, "EvoNormS0", "use fewer groups (num_groups) or inputs with more positions")
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    n, c, s = x3.shape
    x4 = x3.view(n, num_groups, c // num_groups, s)
    v = v if v.dtype == inp.dtype else v.to(inp.dtype)
    if torch.is_grad_enabled():
        y = _EvoNormS0.apply(x4, v, inp.weight, inp.bias, eps)
    else:
        y = _evonorm_s0_terms(x4, v, inp.weight, inp.bias, eps)[0]
    return inp.output(y.view(n, c, s))
