"""Switchable Normalization: learned mixtures of IN, LN and BN statistics (docs/methods.md, section sn)."""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_ops import normalize_affine
from .layout import NormInput, spatial_size
from .moments import check_set_size, combine_moments, pooled_moments, row_moments, update_running_stats
from .pooled_sets import Const, Own, Pooled, Stage, pooled_set_norm, stage_statistics


def switchable_norm(
    x: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
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
    """Switchable Normalization (Luo et al. 2019): the official code's formulas with biased
    variances and PyTorch's running-statistics convention (docs/methods.md, section "Where we
    deviate from official implementations, and why", Switchable Normalization).

    Per ``(n, c)``: ``mu_in, var_in`` over ``S`` (biased); ``mu_ln = mean_c mu_in``,
    ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; ``mu_bn = mean_n mu_in``,
    ``var_bn = mean_n(var_in + mu_in^2) - mu_bn^2`` (both clamped at 0). Mixed with
    ``softmax(mean_logits)`` / ``softmax(var_logits)`` over (IN, LN, BN). Running stats for the
    BN term only (eval uses them for that term).

    Locally (no ``sync``) one autograd node over ``(example, channel)`` row units
    (:func:`~.pooled_sets.pooled_set_norm`, which forms ``var_ln``, ``var_bn`` without cancellation
    as ``mean var_in + mean (mu_in - mu)^2``); the BN term's running statistics are constants at
    inference.
    """
    if training:
        check_set_size(x.shape[0] * spatial_size(x), "SwitchableNorm input (BN term)", "Use a batch with N * S > 1.")
    io = NormInput(x, weight, bias)
    x, dt = io.x, io.dtype
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    stage = _switchable_stage(N, C, training)
    if training and sync:
        return io.output(
            _switchable_synced(
                io, stage, mean_logits, var_logits, running_mean, running_var, factor, eps, process_group
            )
        )
    consts: tuple[Tensor, ...] = ()
    if not training:
        consts = (running_mean.to(dt).repeat(N), running_var.to(dt).repeat(N))
    out = pooled_set_norm(
        x.reshape(1, N * C, S),
        io.weight,
        io.bias,
        (N, 1),
        (stage,),
        eps,
        consts,
        mean_logits=mean_logits,
        var_logits=var_logits,
    )
    if training:  # the batch set's mean and variance (the second pooled part of each)
        batch_stats = out.set_statistics[0]
        update_running_stats(running_mean, running_var, batch_stats.means[1], batch_stats.variances[1], N * S, factor)
    return io.output(out.y)


def _switchable_stage(N: int, C: int, training: bool) -> Stage:
    """SN's statistics, written once for both paths, over ``(example, channel)`` row units ``(N*C,)``:
    the (IN, LN, BN) terms are the row's own moments, the pool of its example's channels and the pool
    of its channel's examples; at inference the BN term is the running statistics (constants 0 and 1
    of :func:`~.pooled_sets.pooled_set_norm`, ``(N*C,)``)."""
    layer, batch = Pooled((N, C), (1,)), Pooled((N, C), (0,))
    if training:
        return Stage((Own(), layer, batch), (Own(), layer, batch))
    return Stage((Own(), layer, Const(0)), (Own(), layer, Const(1)))


def _switchable_synced(
    io: NormInput, stage: Stage, mean_logits, var_logits, running_mean, running_var, factor, eps, process_group
) -> Tensor:
    """SN in training with ``sync``: the terms of ``stage`` from the rows' moments, a pool over the
    batch (dim 0 of the row units) across processes (differentiably, :func:`pooled_moments`), a pool
    within an example from the local rows (:func:`combine_moments`)."""
    x3, dt = io.x3, io.dtype
    N, C, S = x3.shape
    mu_in, var_in = row_moments(x3)  # (N, C, 1): the row units of the parts' shape (N, C), keepdim
    examples: list = []

    def pool(part: Pooled) -> tuple[Tensor, Tensor]:
        if 0 not in part.dims:
            return combine_moments(mu_in, var_in, part.dims)
        mean, var, count = pooled_moments(mu_in, var_in, part.dims, sync=True, process_group=process_group)
        examples.append(count)
        return mean, var

    weights = torch.softmax(mean_logits.to(dt), 0), torch.softmax(var_logits.to(dt), 0)
    mu, var, statistics = stage_statistics(mu_in, var_in, stage, *weights, pool)
    batch_mean, batch_var = statistics.means[1], statistics.variances[1]
    update_running_stats(running_mean, running_var, batch_mean, batch_var, examples[0] * S, factor)
    return normalize_affine(x3, mu, var, io.weight, io.bias, eps)
