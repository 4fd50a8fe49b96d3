"""Custom autograd Functions with lean one-pass backwards, and the one-pass normalize + affine.

``x * scale + shift`` with statistic-sized ``scale``/``shift`` is the single full-size pass of
every method that cannot use a native kernel (the per-channel affine ``gamma_c, beta_c`` folded
into ``scale``/``shift``). :class:`RowMoments` is the row mean / variance behind
:func:`~.moments.row_moments`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fma(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x * a + b`` (broadcasting). A multiply and an in-place add: on CPU ``torch.addcmul`` with
    broadcast operands is 2-2.5x slower than the two passes together."""
    y = x * a
    if torch.broadcast_shapes(y.shape, b.shape) != y.shape:
        return y + b
    return y.add_(b)


def blocks(t: Tensor, r: int) -> Tensor:
    """Repeat each entry of the 1-d ``t`` ``r`` times (``repeat_interleave``, without its index
    computation: a broadcast copy); ``t`` itself when ``r == 1``. Otherwise a real, contiguous tensor: for a
    1-element ``t`` a plain ``reshape`` of the expansion would be a stride-0 view, which native kernels (the
    batch-norm backward among them) read through a raw pointer as if it were dense."""
    return t if r == 1 else t.unsqueeze(1).expand(-1, r).contiguous().view(-1)


#: ATen's ``mse_loss`` with reduction 0 (none): ``(input - target)^2`` elementwise, one kernel (called as
#: the op: ``F.mse_loss``'s Python checks cost 3 us a call, as much as the kernel on a small tensor)
_SQUARED_DIFFERENCE = torch.ops.aten.mse_loss.default


def squared_deviations(x: Tensor, mean: Tensor) -> Tensor:
    """``(x - mean)^2`` elementwise (``mean`` broadcast against ``x``), one full-size temporary written
    in one kernel: one op (kernel launch) instead of a subtraction squared in place. Measured on CPU (torch
    2.14.1, one thread) in :class:`RowMoments` alone: 0.86x and 0.95x the time of the two ops at
    ``(16, 64, 784)`` and ``(8, 256, 196)``. (Also in :func:`~.moments.channel_moments`, the pooled-set
    node's; inside brn's training step at ``(16, 64, 28, 28)`` the step took 1.13x the time with it, and brn
    takes :func:`~.moments.native_channel_moments`.)"""
    return _SQUARED_DIFFERENCE(x, mean.expand_as(x), 0)


class RowMoments(torch.autograd.Function):
    """``x -> (mean, biased var)`` over the last dim, with a fused backward
    ``dx = a * (x - mean) + g_mean / L`` (``a = 2 g_var / L``, per row). Centred: ``a * x - a * mean``
    would cancel in float32 where ``x`` is near its row's mean (rows offset by many stds)."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(-1, keepdim=True)
        return mean, squared_deviations(x, mean).mean(-1, keepdim=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> Tensor:
        # both are tensors: autograd passes zeros for an output that was not used (materialized gradients)
        x, mean = ctx.saved_tensors
        L = x.shape[-1]
        return (x - mean).mul_(g_var * (2.0 / L)).add_(g_mean / L)


class _ScaleShift(torch.autograd.Function):
    """``y = x * scale + shift`` on ``(..., L)`` with statistic-sized ``scale``/``shift``
    (broadcast over ``L``), with a lean backward: ``dx = g * scale``, ``dscale = sum_L g x``,
    ``dshift = sum_L g`` (reduced to their shapes). At most one full-size temporary is live at a
    time (on CPU a second concurrent one can cost more than the arithmetic: fresh pages)."""

    @staticmethod
    def forward(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return fma(x, scale, shift)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, shift = inputs
        ctx.save_for_backward(x, scale)
        ctx.shift_shape = shift.shape

    @staticmethod
    def backward(ctx, g: Tensor):
        x, scale = ctx.saved_tensors
        gx = gscale = gshift = None
        if ctx.needs_input_grad[1]:
            gx_full = g * x  # freed before gx is allocated: one full-size buffer live at a time
            gscale = gx_full.sum(-1, keepdim=True).sum_to_size(scale.shape)
            del gx_full
        if ctx.needs_input_grad[2]:
            gshift = g.sum(-1, keepdim=True).sum_to_size(ctx.shift_shape)
        if ctx.needs_input_grad[0]:
            gx = g * scale
        return gx, gscale, gshift


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` as one fused pass, ``scale``/``shift`` of shape ``(*, 1)``
    broadcasting against ``x (..., L)``; lean backward (see ``_ScaleShift``)."""
    return _ScaleShift.apply(x, scale, shift)


def normalize_affine(
    x3: Tensor, mu: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``gamma_c (x - mu) / sqrt(var + eps) + beta_c`` on ``(N, C, S)`` with ``mu``/``var`` of shape
    ``(N|1, C, 1)``, as one full-size pass ``x * scale + shift`` (scale/shift are statistic-sized)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1)
    shift = -mu * scale
    if bias is not None:
        shift = shift + bias.view(1, -1, 1)
    return scale_shift(x3, scale, shift)


def channel_affine(y3: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Per-channel affine on a ``(N, C, S)`` tensor."""
    if weight is None and bias is None:
        return y3
    if weight is None:
        return y3 + bias.view(1, -1, 1)
    if bias is None:
        return y3 * weight.view(1, -1, 1)
    return fma(y3, weight.view(1, -1, 1), bias.view(1, -1, 1))
