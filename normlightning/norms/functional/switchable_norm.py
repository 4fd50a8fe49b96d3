"""Switchable Normalization: learned mixtures of IN, LN and BN statistics (docs/methods.md, section sn)."""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_ops import normalize_affine
from .layout import NormInput, spatial_size
from .moments import check_set_size, combine_moments, pooled_moments, row_moments, update_running_stats
from .pooled_sets import Own, Pooled, Stage, pooled_set_norm, stage_statistics


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
    as ``mean var_in + mean (mu_in - mu)^2``); at inference the BN term is the running statistics,
    constants per channel (:func:`_switchable_inference`).
    """
    io = NormInput(x, weight, bias)
    if not training:
        return io.output(_switchable_inference(io, mean_logits, var_logits, running_mean, running_var, eps))
    check_set_size(x.shape[0] * spatial_size(x), "SwitchableNorm input (BN term)", "Use a batch with N * S > 1.")
    x = io.x
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    stage = _switchable_stage(N, C)
    if sync:
        return io.output(
            _switchable_synced(
                io, stage, mean_logits, var_logits, running_mean, running_var, factor, eps, process_group
            )
        )
    out = pooled_set_norm(
        x.reshape(1, N * C, S),
        io.weight,
        io.bias,
        (N, 1),
        (stage,),
        eps,
        mean_logits=mean_logits,
        var_logits=var_logits,
    )
    # the batch set's mean and variance (the second pooled part of each)
    batch_stats = out.set_statistics[0]
    update_running_stats(running_mean, running_var, batch_stats.means[1], batch_stats.variances[1], N * S, factor)
    return io.output(out.y)


def _switchable_inference(
    io: NormInput, mean_logits: Tensor, var_logits: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """SN at inference, in few ops (issue 23): the BN term is the running statistics, constants per
    channel, so only the per-(example, channel) moments come from the input.

    ``m, v = row_moments(x)`` ``(N, C, 1)``; the LN term pooled from them, ``M = mean_c m``,
    ``V = mean_c v + var_c m`` (law of total variance, both terms >= 0: no float32 cancellation);
    the six parts ``(m, M, running_mean; v, V, running_var)`` stacked ``(2, 3, N, C, 1)`` and mixed
    with the stacked softmaxes ``(2, 3)`` in one product and one sum; then ``y = gamma_c (x - mu) /
    sqrt(var + eps) + beta_c`` in one native eval-mode batch-norm pass over the ``(1, N*C, S)`` view,
    whose per-unit affine is stacked with the parts. With gradients enabled (the mixture is then
    differentiable, which the native kernel's mean and variance are not) the last pass is
    :func:`~.fused_ops.normalize_affine`. Returns ``(N, C, S)`` or ``(1, N*C, S)``.
    """
    x3, dt = io.x3, io.dtype
    N, C, S = x3.shape
    m, v = row_moments(x3)
    var_m, M = torch.var_mean(m, 1, correction=0, keepdim=True)
    V = v.mean(1, keepdim=True) + var_m
    weights = torch.softmax(torch.stack((mean_logits, var_logits)).to(dt), 1).view(2, 3, 1, 1, 1)
    shape = (N, C, 1)
    per_channel = [t.to(dt).view(1, C, 1) for t in (running_mean, running_var)]
    parts = [m, M, per_channel[0], v, V, per_channel[1]]
    differentiable = torch.is_grad_enabled()
    affine = [] if differentiable else [t.view(1, C, 1) for t in (io.weight, io.bias) if t is not None]
    stacked = torch.stack([t.expand(shape) for t in parts + affine])
    mu, var = (stacked[:6].view(2, 3, *shape) * weights).sum(1)
    if differentiable:
        return normalize_affine(x3, mu, var, io.weight, io.bias, eps)
    per_unit = iter(stacked[6:].view(-1, N * C))  # the affine per (example, channel)
    w = None if io.weight is None else next(per_unit)
    b = None if io.bias is None else next(per_unit)
    return torch.batch_norm(io.x.reshape(1, N * C, S), w, b, mu.view(-1), var.view(-1), False, 0.0, eps, False)


def _switchable_stage(N: int, C: int) -> Stage:
    """SN's training statistics, written once for the local and the synchronized path, over
    ``(example, channel)`` row units ``(N*C,)``: the (IN, LN, BN) terms are the row's own moments,
    the pool of its example's channels and the pool of its channel's examples."""
    layer, batch = Pooled((N, C), (1,)), Pooled((N, C), (0,))
    return Stage((Own(), layer, batch), (Own(), layer, batch))


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
