"""Methods whose sets are per channel over the batch: BN (with inference example weighing),
GhostNorm / Ghost BN and Batch Renormalization (docs/methods.md, sections bn, ghost, brn).

Fast paths onto the native batch norm (:func:`~.native.native_batch_norm`): BN directly, Ghost
on the view ``(N/G_M, G_M*C, S)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_ops import channel_affine
from .layout import NormInput, spatial_size
from .moments import channel_moments, check_set_size, needs_shift, synced_mean_var, update_running_stats
from .native import native_batch_norm


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


def example_weighted_norm(
    x3: Tensor,
    pop_mean: Tensor,
    pop_ex2: Tensor,
    alpha: float,
    eps: float,
) -> Tensor:
    """Inference example weighing (Summers & Dinneen, "Four Things"; docs/methods.md, section
    "Inference example weighing").

    ``x3``: ``(N, K, L)``; per ``(n, k)`` the example's own moments over ``L`` are mixed with
    the population moments ``pop_mean``/``pop_ex2`` (shape ``(K,)``, ``pop_ex2 = E_pop[x^2]``):
    ``mu = (1-a) mu_pop + a mu_ex``, ``s = (1-a) E_pop[x^2] + a E_ex[x^2]``,
    ``var = max(s - mu^2, 0)``; returns ``(x - mu) / sqrt(var + eps)`` (no affine).
    """
    mu_ex = x3.mean(dim=2, keepdim=True)
    ex2_ex = (x3 * x3).mean(dim=2, keepdim=True)
    mu = (1.0 - alpha) * pop_mean.view(1, -1, 1) + alpha * mu_ex
    s = (1.0 - alpha) * pop_ex2.view(1, -1, 1) + alpha * ex2_ex
    var = (s - mu * mu).clamp_min(0.0)
    return (x3 - mu) * torch.rsqrt(var + eps)


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


def check_ghost_batches(N: int, G: int, S: int) -> None:
    """Raise ``ValueError`` (naming the fix) when ``N`` examples cannot form ``G`` ghost batches
    whose sets ``(N/G, S)`` hold more than one value."""
    if N < G:
        raise ValueError(
            f"GhostNorm cannot split a batch of N={N} examples into num_groups (G_M)={G} ghost "
            f"batches. Use a batch of at least {G} examples (e.g. drop_last=True in the loader) "
            f"or a smaller num_groups / larger ghost_batch_size."
        )
    check_set_size(
        (N // G) * S,
        f"GhostNorm with N={N}, G_M={G}, S={S}",
        "Use fewer ghost batches (num_groups) or larger ghost batches (ghost_batch_size).",
    )


def ghost_norm(
    x: Tensor,
    num_ghosts: int,
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
    """GhostNorm / Ghost BN: BN statistics per ghost batch, per channel over ``(N/G_M, S)``.

    Ghost batch ``j`` (``0 <= j < G_M``) is the samples ``n = j (mod G_M)`` (strided membership;
    for shuffled data the same as contiguous chunks). When ``G_M`` divides ``N`` every ghost
    batch comes from one native call on the view ``(N/G_M, G_M*C, S)``. Otherwise (e.g. an
    epoch's smaller last batch) the ghost batches are nearly equal: the first ``N mod G_M`` hold
    one more example. ``N < G_M`` or a ghost set of one element is an error. Below float64 the
    native kernel gets each ghost set of one example shifted by its first value (docs/methods.md,
    "Precision").

    Running statistics (per channel) are updated once per forward with the mean of the ghost
    batches' means and the mean of their unbiased variances. Eval: as BN (with ``alpha``).
    """
    if not training:
        return batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps, alpha=alpha)
    N, C, S = x.shape[0], x.shape[1], spatial_size(x)
    G = num_ghosts
    check_ghost_batches(N, G, S)
    io = NormInput(x, weight, bias)
    x3, w, b = io.x3, io.weight, io.bias
    if G == 1 and not sync:  # one ghost batch: BN, whose native update is the ghost rule for G_M = 1
        return io.output(native_batch_norm(io.x, running_mean, running_var, w, b, True, factor, eps))
    if N % G == 0:
        xv = x3.reshape(N // G, G * C, S)
        y, means, uvars = _ghost_pass(xv, G, w, b, eps, sync, process_group)
    else:
        ys, ms, vs = [], [], []
        for j in range(G):
            yj, mj, vj = _ghost_pass(x3[j::G], 1, w, b, eps, sync, process_group)
            ys.append(yj)
            ms.append(mj)
            vs.append(vj)
        order = torch.cat([torch.arange(j, N, G, device=x.device) for j in range(G)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(N, device=x.device)
        y = torch.cat(ys, 0)[inverse]
        means, uvars = torch.cat(ms, 0), torch.cat(vs, 0)
    with torch.no_grad():
        running_mean.lerp_(means.mean(0).to(running_mean.dtype), factor)
        running_var.lerp_(uvars.mean(0).to(running_var.dtype), factor)
    return io.output(y)


def _ghost_pass(xv: Tensor, G: int, w, b, eps, sync, process_group):
    """Normalize the view ``(M, G*C, S)``; return output and per-ghost mean / unbiased var ``(G, C)``."""
    K = xv.shape[1]
    C = K // G
    wk = None if w is None else w.repeat(G)
    bk = None if b is None else b.repeat(G)
    if not sync:
        # The native kernel writes the batch mean and the *unbiased* batch variance into fresh
        # buffers when momentum = 1, so the ghost statistics come for free.
        tmp_mean = torch.zeros(K, dtype=xv.dtype, device=xv.device)
        tmp_var = torch.ones(K, dtype=xv.dtype, device=xv.device)
        # Below float64, ghost sets of one example (M = 1, where a constant feature map makes the whole set
        # equal) are shifted by their first value (detached; it cancels in x - mu): the kernel's mean of equal
        # values is then exactly 0, not a rounding over sqrt(eps). Sets of several examples keep the kernel's
        # rounding, as bn does (docs/methods.md, "Precision").
        first = xv.detach()[:, :, :1] if xv.shape[0] == 1 and needs_shift(xv.dtype) else None  # (1, K, 1)
        y = native_batch_norm(xv if first is None else xv - first, tmp_mean, tmp_var, wk, bk, True, 1.0, eps)
        means = tmp_mean if first is None else tmp_mean + first.reshape(K)
        return y, means.view(G, C), tmp_var.view(G, C)
    mean, var, count = synced_mean_var(xv, (0, 2), process_group=process_group)
    y = (xv - mean) * torch.rsqrt(var + eps)
    if wk is not None:
        y = y * wk.view(1, -1, 1)
    if bk is not None:
        y = y + bk.view(1, -1, 1)
    with torch.no_grad():
        uvar = var.detach() * (count / (count - 1))
    return y, mean.detach().view(G, C), uvar.view(G, C)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    r_max: float,
    d_max: float,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
    reference: tuple[Tensor, Tensor] | None = None,
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
    Eval: BN with the running statistics.
    """
    if not training:
        return batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
    check_set_size(x.shape[0] * spatial_size(x), "BatchRenorm input", "Use a batch with N * S > 1.")
    io = NormInput(x, weight, bias)
    dt, x3 = io.dtype, io.x3
    with torch.no_grad():
        if sync:
            mean, var, _ = synced_mean_var(x3.detach(), (0, 2), process_group=process_group)
            mean, var = mean.view(-1), var.view(-1)
        else:
            mean, var = channel_moments(io.x)
        ref_mean, ref_var = (running_mean, running_var) if reference is None else reference
        inv_sigma_r = torch.rsqrt(ref_var.to(dt) + eps)
        r = (torch.sqrt(var + eps) * inv_sigma_r).clamp(1.0 / r_max, r_max)
        d = ((mean - ref_mean.to(dt)) * inv_sigma_r).clamp(-d_max, d_max)
    w, b = io.weight, io.bias
    w_eff = r if w is None else w * r
    b_eff = d if w is None else w * d
    if b is not None:
        b_eff = b_eff + b
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
