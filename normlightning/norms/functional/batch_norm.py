"""Batch Norm (with inference example weighing) and Batch Renormalization: per-channel sets over
the batch (docs/methods.md, sections bn, brn), onto the native batch norm
(:func:`~.native.native_batch_norm`). :func:`normalize_batch_sets` (per ``k`` of a ``(N, K, L)`` view
over ``(N, L)``) is also bgn's, :func:`group_batch_norm` (groups of the flattened ``C*S`` over the
batch) bgn's and gbgn's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .example_weighing import example_weighted_norm
from .fused_ops import blocks, channel_affine
from .layout import NormInput, laid_out_as, memory_format_of, spatial_size
from .moments import check_set_size, native_channel_moments, synced_mean_var, update_running_stats
from .native import native_batch_norm, native_channel_affine


def normalize_batch_sets(
    x3: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    factor: float,
    eps: float,
    sync: bool,
    process_group,
) -> Tensor:
    """Normalize a ``(N, K, L)`` view per ``k`` over ``(N, L)``; weight/bias of shape ``(K,)``.

    Training: batch statistics, running buffers (shape ``(K,)``) updated. Eval: running stats.
    Native batch norm unless ``sync`` (the moments path of :func:`synced_mean_var`).
    """
    if not training or not sync:
        return native_batch_norm(x3, running_mean, running_var, weight, bias, training, factor, eps)
    mean, var, count = synced_mean_var(x3, (0, 2), process_group=process_group)
    update_running_stats(running_mean, running_var, mean, var, count, factor)
    y = (x3 - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y


#: Below this many channels per group, a channels_last input is copied to ``(N, G, D/G)`` rather than viewed as
#: ``(N*S, G, C/G)``: the CPU batch-norm kernels on a view with rows of ``C/G`` values were 2.1x slower than
#: the copy at ``C/G = 2`` and as fast or faster at 8 (torch 2.14.1, one thread, forward + backward).
MIN_CHANNELS_PER_GROUP_VIEWED = 8


def _groups_of_many_channels(channels: int, groups: int) -> bool:
    """Groups of at least :data:`MIN_CHANNELS_PER_GROUP_VIEWED` whole channels (viewed, not copied,
    in channels_last)."""
    return channels % groups == 0 and channels // groups >= MIN_CHANNELS_PER_GROUP_VIEWED


def _group_view(x: Tensor, groups: int) -> Tensor:
    """``x (N, C, *spatial)`` as ``(N, G, D/G)`` (a view when ``x`` is contiguous) or, for a channels_last
    ``x`` whose groups are at least :data:`MIN_CHANNELS_PER_GROUP_VIEWED` whole channels, the view
    ``(N*S, G, C/G)``; each group's values are dim 1's entry ``g``."""
    C = x.shape[1]
    if _groups_of_many_channels(C, groups) and memory_format_of(x) in (torch.channels_last, torch.channels_last_3d):
        return x.movedim(1, -1).reshape(-1, groups, C // groups)
    return x.reshape(x.shape[0], groups, -1)


def _from_group_view(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (:func:`_group_view`'s shape for ``x``) in ``x``'s shape: a view for the views it made."""
    if y.shape[0] == x.shape[0]:
        return y.view(x.shape)
    last = (x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)
    return y.view(last).movedim(-1, 1)


class _ChannelGroupBatchNorm(torch.autograd.Function):
    """Groups of whole channels normalized over the batch with a per-channel affine (docs/methods.md,
    section bgn): forward one native training-mode batch norm over the groups (:func:`_group_view`,
    running buffers updated) and one native eval-mode pass for the affine; it saves ``x`` and the groups'
    mean and ``1/sigma`` only (as ``nn.BatchNorm2d``; autograd of the two kernels would also keep the
    normalized tensor). Backward: ``d gamma``, ``d beta`` from one native backward reduction per channel with
    each channel's group statistics, then ``dx`` from the native training-mode backward over the groups
    fed ``g gamma``. No second derivative."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, running_mean, running_var, factor, eps):
        xv = _group_view(x, groups)
        y, mean, invstd = torch.native_batch_norm(xv, None, None, running_mean, running_var, True, factor, eps)
        y = native_channel_affine(_from_group_view(y, x), weight, bias)  # (no grad here: no hook either)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight, mean, invstd = ctx.saved_tensors
        g = laid_out_as(g, x.stride())
        per_group = x.shape[1] // ctx.groups
        g_weight = g_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            mean_c, invstd_c = blocks(mean, per_group), blocks(invstd, per_group)
            mask = [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
            _, g_weight, g_bias = _BN_BACKWARD(g, x, None, None, None, mean_c, invstd_c, True, ctx.eps, mask)
        g_x = None
        if ctx.needs_input_grad[0]:
            g_hat = g if weight is None else g * weight.view((1, -1) + (1,) * (x.dim() - 2))
            xv = _group_view(x, ctx.groups)
            g_xv = _BN_BACKWARD(
                _group_view(g_hat, ctx.groups), xv, None, None, None, mean, invstd, True, ctx.eps, [True, False, False]
            )[0]
            g_x = _from_group_view(g_xv, x)
        return g_x, g_weight, g_bias, None, None, None, None, None


#: ATen's batch-norm backward (``torch.ops.aten.native_batch_norm_backward``)
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def group_batch_norm(
    x: Tensor,
    groups: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    factor: float,
    eps: float,
) -> Tensor:
    """``gamma_c (x - mu_g) / sqrt(var_g + eps) + beta_c`` on ``x (N, C, *spatial)`` with ``G`` groups of
    ``D/G`` contiguous values of the flattened ``D = C*S``, statistics over the batch (docs/methods.md,
    section bgn); ``weight``/``bias`` ``(C,)`` or ``None``.

    One native training-mode batch norm on a view whose dim 1 is the groups, ``(N, G, D/G)`` or, for a
    channels_last input whose groups are at least :data:`MIN_CHANNELS_PER_GROUP_VIEWED` whole channels,
    ``(N*S, G, C/G)`` (any other input is copied once to contiguous), then the per-channel affine as one
    native eval-mode batch norm (mean 0, variance 1, ``eps = 0``: exact). Groups of whole channels run as
    one autograd node (:class:`_ChannelGroupBatchNorm`: no normalized tensor kept for backward); groups
    that straddle channels as the two kernels' autograd. Running buffers ``(G,)`` (or ``None``): PyTorch's
    update, ``r <- (1-f) r + f b`` with the unbiased variance of ``n = N*D/G`` values (buffers of another
    dtype than ``x`` through a copy in ``x``'s dtype). The result has ``x``'s shape.
    """
    C = x.shape[1]
    rm = running_mean if running_mean is None or running_mean.dtype == x.dtype else running_mean.to(x.dtype)
    rv = running_var if running_var is None or running_var.dtype == x.dtype else running_var.to(x.dtype)
    fmt = memory_format_of(x)
    if fmt is None or (fmt != torch.contiguous_format and not _groups_of_many_channels(C, groups)):
        x = x.contiguous()
    if C % groups == 0:
        y = _ChannelGroupBatchNorm.apply(x, weight, bias, groups, rm, rv, factor, eps)
    else:
        y = native_batch_norm(x.reshape(x.shape[0], groups, -1), rm, rv, None, None, True, factor, eps)
        y = native_channel_affine(y.view(x.shape), weight, bias)
    if rm is not running_mean:
        running_mean.copy_(rm)
    if rv is not running_var:
        running_var.copy_(rv)
    return y


def batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.1,
    eps: float = 1e-5,
    alpha: float = 0.0,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Batch Norm (Ioffe & Szegedy 2015): per channel over ``(N, S)``.

    ``y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c``; training uses batch statistics and
    updates ``running_mean``/``running_var`` (shape ``(C,)``); eval uses them, mixed with the
    example's own moments when ``alpha > 0`` (inference example weighing).
    """
    if training:
        n = x.shape[0] * spatial_size(x)
        check_set_size(n, "BatchNorm input", "Use a batch of more than one example (N * S > 1).")
    io = NormInput(x, weight, bias)
    w, b = io.weight, io.bias
    if not training and alpha != 0.0:
        pop_mean = running_mean.to(io.dtype)
        pop_ex2 = running_var.to(io.dtype) + pop_mean**2
        y = channel_affine(example_weighted_norm(io.x3, pop_mean, pop_ex2, alpha, eps), w, b)
    elif sync and training:
        y = normalize_batch_sets(
            io.x3,
            running_mean,
            running_var,
            w,
            b,
            training=True,
            factor=factor,
            eps=eps,
            sync=True,
            process_group=process_group,
        )
    else:
        y = native_batch_norm(io.x, running_mean, running_var, w, b, training, factor, eps)
    return io.output(y)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    r_max: float | Tensor,
    d_max: float | Tensor,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
    reference: tuple[Tensor, Tensor] | None = None,
    d_min: float | Tensor | None = None,
) -> Tensor:
    """Batch Renormalization (Ioffe 2017).

    ``r = sg(clip(sigma_B / sigma_run, 1/r_max, r_max))``,
    ``d = sg(clip((mu_B - mu_run) / sigma_run, -d_max, d_max))``,
    ``x_hat = (x - mu_B) / sigma_B * r + d``, ``y = gamma x_hat + beta`` with
    ``sigma = sqrt(var + eps)``; ``r, d`` use the running statistics *before* this step's
    update, or ``reference = (mu_run, var_run)`` when given (the running buffers are still the
    ones updated: recalibration rebuilds them while ``r, d`` keep the trained statistics). Since
    ``gamma (x_hat_BN r + d) + beta = x_hat_BN (gamma r) + (gamma d + beta)``, the
    output is one native batch-norm call with weight ``gamma r`` and bias ``gamma d + beta``.
    ``d_min``: ``-d_max`` when ``None`` (a caller that has it, a 0-d tensor, saves the negation).
    Training only: eval is BN with the running statistics (:class:`~normlightning.norms.BatchRenorm`
    normalizes with ``inference_channel_statistics()``, or :func:`batch_norm` with ``training=False``).
    """
    check_set_size(x.shape[0] * spatial_size(x), "BatchRenorm input", "Use a batch with N * S > 1.")
    io = NormInput(x, weight, bias)
    dt, x3 = io.dtype, io.x3
    with torch.no_grad():
        if sync:
            mean, var, _ = synced_mean_var(x3.detach(), (0, 2), process_group=process_group)
            mean, var = mean.view(-1), var.view(-1)
        else:
            mean, var = native_channel_moments(io.x)
        ref_mean, ref_var = (running_mean, running_var) if reference is None else reference
        inv_sigma_r = torch.rsqrt(ref_var.to(dt) + eps)
        r_min = r_max.reciprocal() if isinstance(r_max, Tensor) else 1.0 / r_max
        r = (torch.sqrt(var + eps) * inv_sigma_r).clamp(r_min, r_max)
        d = ((mean - ref_mean.to(dt)) * inv_sigma_r).clamp(-d_max if d_min is None else d_min, d_max)
    w, b = io.weight, io.bias
    w_eff = r if w is None else w * r
    if w is None:
        b_eff = d if b is None else d + b
    else:
        b_eff = w * d if b is None else torch.addcmul(b, w, d)  # gamma d + beta in one op
    y = normalize_batch_sets(
        x3 if sync else io.x,
        running_mean,
        running_var,
        w_eff,
        b_eff,
        training=True,
        factor=factor,
        eps=eps,
        sync=sync,
        process_group=process_group,
    )
    return io.output(y)
