"""Filter Response Normalization with its thresholded linear unit (docs/methods.md, section "frn")."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .layout import NormInput


def _frn_tlu(
    x3: Tensor, weight: Tensor | None, bias: Tensor | None, tau: Tensor | None, eps: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FRN + TLU of ``x3 (N, C, S)`` (docs/methods.md, section "frn"); per-channel operands ``(C,)``.

    Returns ``(z, y, rstd, scale)``: the output ``z = max(y, tau)`` (``y`` itself without ``tau``), the
    pre-TLU ``y = x · scale + beta``, ``rstd = 1 / sqrt(nu2 + eps)`` and ``scale = gamma · rstd``, both
    ``(N, C, 1)``. One full-size pass for ``y`` (``scale``/``beta`` statistic-sized), one for the TLU.
    """
    rstd = torch.rsqrt(x3.square().mean(dim=2, keepdim=True) + eps)
    scale = rstd if weight is None else rstd * weight.view(1, -1, 1)
    y = x3 * scale if bias is None else (x3 * scale).add_(bias.view(1, -1, 1))
    z = y if tau is None else torch.maximum(y, tau.view(1, -1, 1))
    return z, y, rstd, scale


class _FilterResponseNorm(torch.autograd.Function):
    """:func:`_frn_tlu` with one hand-written backward (fewer and larger kernels than autograd's chain
    over the small statistics). With ``g_y`` the gradient of ``y`` (``g_z`` where ``y > tau``, half of it
    where ``y = tau``, as ``torch.maximum``'s gradient; ``g_z`` without the TLU)::

        A[n,c]   = Σ_s g_y · x                    (N, C, 1)
        dL/dx    = scale · (g_y − x · A · rstd² / S)
        dL/dgamma_c = Σ_n A · rstd,   dL/dbeta_c = Σ_{n,s} g_y,   dL/dtau_c = Σ_{n,s} (g_z − g_y)
        dL/deps  = −1/2 · Σ_{n,c} A · rstd² · scale          (a learned eps)

    A second derivative raises (the backward is not differentiated).
    """

    @staticmethod
    def forward(ctx, x3, weight, bias, tau, eps):
        z, y, rstd, scale = _frn_tlu(x3, weight, bias, tau, eps)
        ctx.save_for_backward(x3, rstd, scale, y if tau is not None else None, tau)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, g_z: Tensor):
        x3, rstd, scale, y, tau = ctx.saved_tensors
        need_x, need_weight, need_bias, need_tau, need_eps = ctx.needs_input_grad
        g_y = g_z
        g_weight = g_bias = g_tau = g_eps = g_x = None
        if tau is not None:
            # the share of the TLU's input: 1 above tau, 1/2 at a tie, 0 below (torch.maximum's rule)
            g_y = g_z * torch.heaviside(y - tau.view(1, -1, 1), y.new_full((), 0.5))
        if need_bias or need_tau:
            sum_g_y = g_y.sum(dim=(0, 2))
            g_bias = sum_g_y if need_bias else None
            g_tau = g_z.sum(dim=(0, 2)) - sum_g_y if need_tau else None
        a = (g_y * x3).sum(dim=2, keepdim=True)  # (N, C, 1)
        a_rstd = a * rstd
        if need_weight:
            g_weight = a_rstd.sum(dim=0).view(-1)
        a_rstd2 = a_rstd * rstd
        if need_x:
            g_x = torch.addcmul(g_y, x3, a_rstd2, value=-1.0 / x3.shape[2]).mul_(scale)
        if need_eps:
            g_eps = (a_rstd2 * scale).sum() * -0.5
        return g_x, g_weight, g_bias, g_tau, g_eps


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

    With gradients, one autograd node (:class:`_FilterResponseNorm`).

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
    if tau is not None and tau.dtype != inp.dtype:
        tau = tau.to(inp.dtype)
    if torch.is_grad_enabled():
        z = _FilterResponseNorm.apply(x3, inp.weight, inp.bias, tau, eps)
    else:
        z = _frn_tlu(x3, inp.weight, inp.bias, tau, eps)[0]
    return inp.output(z)
