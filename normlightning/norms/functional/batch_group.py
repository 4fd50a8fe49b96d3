"""Batch Group Norm: sets of contiguous groups of the flattened ``D = C*S`` over the batch
(docs/methods.md, section bgn), with its fused training op (one autograd node)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..group_args import nearby_divisors
from .batch_sets import normalize_batch_sets
from .fused_ops import RowMoments, blocks, fma, scale_shift
from .layout import NormInput
from .moments import check_set_size, combine_moments, set_mean_var, update_running_stats


class _BlockSetNorm(torch.autograd.Function):
    """Training-mode set normalization with per-channel affine on a block view ``x (N, K, L)``:
    blocks of ``L`` contiguous values, each inside one set and one channel; ``per_group`` blocks
    form a set (statistics over ``(N, per_group*L)``), ``per_channel`` blocks a channel.
    Returns ``(y, mean, var)`` (``mean``/``var`` per set, biased, not differentiable).

    Backward: one fused reduction (native batch-norm backward in eval mode gives the per-block
    ``sum g`` and ``sum g*xhat`` in one pass), pooled per set/channel, then one fused full-size
    pass ``dx = a*g + b*x + c`` with per-block ``a, b, c`` from
    ``dx = (dxhat - mean_set(dxhat) - xhat*mean_set(dxhat*xhat)) / sigma``, ``dxhat = g*gamma``.
    """

    @staticmethod
    def forward(x, weight, bias, per_group: int, per_channel: int, eps: float):
        N, K, L = x.shape
        G = K // per_group
        mean, var = RowMoments.forward(x.reshape(N, G, per_group * L))  # no grad needed here
        mean, var = combine_moments(mean, var, (0,))
        mean, var = mean.view(G), var.view(G)
        scale, shift = _block_scale_shift(mean, var, weight, bias, per_group, per_channel, eps)
        y = fma(x, scale.view(1, K, 1), shift.view(1, K, 1))
        return y, mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, per_group, per_channel, eps = inputs
        _, mean, var = output
        ctx.save_for_backward(x, weight, mean, var)
        ctx.consts = (per_group, per_channel, eps)
        ctx.mark_non_differentiable(mean, var)

    @staticmethod
    @once_differentiable  # a second derivative would need its own formula: raise, don't be wrong
    def backward(ctx, g, _gm=None, _gv=None):
        x, weight, mean, var = ctx.saved_tensors
        per_group, per_channel, eps = ctx.consts
        N, K, L = x.shape
        G = K // per_group
        mb, vb = blocks(mean, per_group), blocks(var, per_group)
        # per-block sum g*xhat and sum g over (N, L), one fused pass
        _, s_gx, s_g = torch.ops.aten.native_batch_norm_backward(
            g, x, None, mb, vb, None, None, False, eps, [False, True, True]
        )
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = s_gx.view(-1, per_channel).sum(1)
        if ctx.needs_input_grad[2]:
            gb = s_g.view(-1, per_channel).sum(1)
        gx = None
        if ctx.needs_input_grad[0]:
            rstd = torch.rsqrt(var + eps)
            gam = None if weight is None else blocks(weight, per_channel)
            t1, t2 = (s_g, s_gx) if gam is None else (s_g * gam, s_gx * gam)
            n = N * per_group * L
            m1 = t1.view(G, per_group).sum(1) / n  # mean_set(dxhat)
            m2 = t2.view(G, per_group).sum(1) / n  # mean_set(dxhat * xhat)
            rb = blocks(rstd, per_group)
            a = rb if gam is None else rb * gam
            bco = -rstd * rstd * m2
            c = -rstd * m1 - bco * mean
            b_, c_ = blocks(bco, per_group), blocks(c, per_group)
            gx = g * a.view(1, K, 1)
            gx.addcmul_(x, b_.view(1, K, 1)).add_(c_.view(1, K, 1))
        return gx, gw, gb, None, None, None


def _block_scale_shift(mean, var, weight, bias, per_group: int, per_channel: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per block ``k`` (in set ``g``, channel ``c``): ``scale_k = gamma_c / sqrt(var_g + eps)``,
    ``shift_k = beta_c - mu_g * scale_k``, shape ``(K,)``, from set statistics ``(G,)`` and the
    affine ``(C,)`` (``per_group`` / ``per_channel`` blocks per set / channel)."""
    scale = blocks(torch.rsqrt(var + eps), per_group)
    if weight is not None:
        scale = scale * blocks(weight, per_channel)
    shift = -blocks(mean, per_group) * scale
    if bias is not None:
        shift = shift + blocks(bias, per_channel)
    return scale, shift


def batch_group_norm(
    x: Tensor,
    num_groups: int,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Batch Group Norm (Zhou et al., AAAI 2021), eqs. (8)-(9).

    Flatten ``(C, S)`` to ``D = C*S``, cut ``D`` into ``G`` contiguous groups of ``D/G``;
    per group over ``(N, D/G)`` (native ``F.batch_norm`` on the view ``(N, G, D/G)``).
    Running statistics per group (shape ``(G,)``); per-channel affine. When ``G`` is a multiple
    of ``C`` every group lies in one channel and the affine is fused into the native call.
    Otherwise the group statistics (or, in eval, the running ones) are computed once
    (:func:`set_mean_var`) and normalization + affine are one pass :func:`scale_shift` with
    statistic-sized scale/shift; local training (no ``sync``) is one autograd node
    (``_BlockSetNorm``) with a fused backward.
    """
    N, C = x.shape[0], x.shape[1]
    D = x[0].numel()
    G = num_groups
    if D % G != 0:
        dims = "·".join(str(s) for s in x.shape[1:])
        names = "·".join(("C", "L") if x.dim() == 3 else ("C", "H", "W") if x.dim() == 4 else ("C", "D", "H", "W")[: x.dim() - 1])
        raise ValueError(
            f"BatchGroupNorm num_groups={G} must divide D = {names} = {dims} = {D}; "
            f"valid choices (divisors of {D}) near {G}: {nearby_divisors(D, G)}."
        )
    if training:
        check_set_size(N * (D // G), f"BatchGroupNorm with N={N}, D/G={D // G}", "Use a larger batch or fewer groups.")
    io = NormInput(x, weight, bias)
    w, b = io.weight, io.bias
    Lg = D // G
    if G % C == 0:
        # every group lies in one channel: the affine is the native kernel's per-"channel" one
        r = G // C
        wg = None if w is None else w.repeat_interleave(r)
        bg = None if b is None else b.repeat_interleave(r)
        xv = io.x.reshape(N, G, Lg)
        y = normalize_batch_sets(
            xv, running_mean, running_var, wg, bg, training=training, factor=factor, eps=eps, sync=sync, process_group=process_group
        )
        return io.output(y)
    # Group statistics once, then normalization and the per-channel affine as one pass
    # x * scale + shift over blocks of L = gcd(S, D/G) contiguous values, each inside one group
    # and one channel (L = S when groups are whole channels, L = D/G when channels split).
    S = D // C
    L = math.gcd(S, Lg)
    K = D // L
    per_group, per_channel = Lg // L, S // L  # blocks per group / per channel
    xb = io.x.reshape(N, K, L)
    if training and not sync:
        # one autograd node: fused statistics + normalize + affine, fused backward
        y, mean, var = _BlockSetNorm.apply(xb, w, b, per_group, per_channel, eps)
        update_running_stats(running_mean, running_var, mean, var, N * Lg, factor)
        return io.output(y)
    if training:
        mean, var, count = set_mean_var(io.x.reshape(N, G, Lg), (0, 2), sync=sync, process_group=process_group)
        update_running_stats(running_mean, running_var, mean, var, count, factor)
        mean, var = mean.view(G), var.view(G)
    else:
        mean, var = running_mean.to(io.dtype), running_var.to(io.dtype)
    scale, shift = _block_scale_shift(mean, var, w, b, per_group, per_channel, eps)
    return io.output(scale_shift(xb, scale.view(1, K, 1), shift.view(1, K, 1)))
