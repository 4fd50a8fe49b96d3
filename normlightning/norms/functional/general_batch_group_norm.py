"""The batch + group normalization of "Four Things" (Summers & Dinneen), the authors' math
(docs/methods.md, section gbgn)."""

from __future__ import annotations

import torch
from torch import Tensor

from .batch_norm import group_batch_norm
from .example_weighing import example_weighted_norm
from .fused_ops import blocks, channel_affine, normalize_affine
from .layout import NormInput, spatial_size
from .moments import check_set_size, chunk_sizes, pooled_moments, reduce_mean, row_moments
from .native import native_batch_norm, native_channel_affine


def general_batch_group_norm(
    x: Tensor,
    channel_groups: int,
    examples_per_group: int | None,
    moving_x: Tensor,
    moving_x2: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.01,
    eps: float = 1e-5,
    alpha: float = 0.0,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Batch + group normalization (Summers & Dinneen, ICLR 2020), the authors' math.

    Training: examples in contiguous groups of ``E`` (``None`` = the whole batch; a batch
    that ``E`` does not divide is cut into ``ceil(N/E)`` nearly equal contiguous groups),
    channels in ``G_C`` groups; per (example group, channel group) block ``mu = E[x]``,
    ``var = max(E[x^2] - mu^2, 0)`` over ``(E, C/G_C, S)``. Running statistics are the raw
    per-channel moments ``moving_x`` (``E[x]``) and ``moving_x2`` (``E[x^2]``) over ``(N, S)``.
    Eval: the moments are averaged over each channel group, ``var = max(m2 - m1^2, 0)``, and
    mixed with the example's own moments over ``(C/G_C, S)`` when ``alpha > 0``.

    Local training with equal example groups is one native training-mode batch norm without affine
    over the sets (its two-pass set variance is this one computed without cancellation: ``mean v + mean
    (m1 - mu)^2 = E[(x - mu)^2]``), on the view ``(N, G_C, C/G_C * S)`` (:func:`~.batch_norm.group_batch_norm`)
    or, for ``E < N``, on one permuted copy (:func:`_normalize_example_groups`), then the per-channel affine
    (:func:`~.native.native_channel_affine`); the raw moments of the buffers are two more reductions under
    ``no_grad``.
    Eval without ``alpha`` is the layer's one native eval-mode batch norm with
    :func:`general_batch_group_channel_statistics`.
    """
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    Gc = channel_groups
    Cg = C // Gc
    io = NormInput(x, weight, bias)
    x3, w, b = io.x3, io.weight, io.bias
    if not training:  # alpha = 0 mixes in nothing (the layer then uses inference_channel_statistics())
        m1 = moving_x.to(io.dtype).view(Gc, Cg).mean(1)
        m2 = moving_x2.to(io.dtype).view(Gc, Cg).mean(1)
        yg = example_weighted_norm(x3.reshape(N, Gc, Cg * S), m1, m2, alpha, eps)
        return io.output(channel_affine(yg.reshape(N, C, S), w, b))
    E = N if examples_per_group is None else examples_per_group
    k = -(-N // E)
    sizes = chunk_sizes(N, k)
    check_set_size(
        min(sizes) * Cg * S,
        f"GeneralBatchGroupNorm with N={N}, examples_per_group={E}, C/G_C={Cg}, S={S}",
        "Use more examples per group or fewer channel groups.",
    )
    if sync or N % E != 0:
        return io.output(_gbgn_moments(io, Gc, sizes, moving_x, moving_x2, factor, eps, sync, process_group))
    # local, equal groups: one native training-mode batch norm without affine over the sets, the affine after
    with torch.no_grad():  # the raw moments per channel over (N, S)
        dims = [d for d in range(io.x.dim()) if d != 1]
        moving_x.lerp_(io.x.mean(dims).to(moving_x.dtype), factor)
        moving_x2.lerp_((io.x * io.x).mean(dims).to(moving_x2.dtype), factor)
    if E == N:
        return io.output(group_batch_norm(io.x, Gc, None, None, w, b, 0.0, eps))
    return io.output(native_channel_affine(_normalize_example_groups(x3, N // E, Gc, eps), w, b))


def _normalize_example_groups(x3: Tensor, groups: int, channel_groups: int, eps: float) -> Tensor:
    """``x3 (N, C, S)`` normalized without affine per (example group ``k``, channel group ``g``) over
    ``(N/groups, C/G_C, S)`` (equal contiguous example groups): the sets made the channels of one native
    training-mode batch norm by one permuted copy ``(1, groups*G_C, N/groups * C/G_C * S)``, and the result
    copied back into ``x3``'s layout."""
    N, C, S = x3.shape
    x5 = x3.reshape(groups, N // groups, channel_groups, C // channel_groups, S)  # a view of x3
    sets = x5.transpose(1, 2).reshape(1, groups * channel_groups, -1)
    y = native_batch_norm(sets, None, None, None, None, True, 0.0, eps)
    y5 = y.view(groups, channel_groups, N // groups, C // channel_groups, S).transpose(1, 2)
    return torch.empty_like(x5).copy_(y5).view(N, C, S)


def general_batch_group_channel_statistics(
    moving_x: Tensor, moving_x2: Tensor, channel_groups: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The inference mean and variance per channel ``(C,)`` without example weighing: the raw
    moments averaged over each channel group, ``var = max(m2 - m1^2, 0)``, spread to the group's
    channels."""
    Cg = moving_x.shape[0] // channel_groups
    m1 = moving_x.to(dtype).view(channel_groups, Cg).mean(1)
    m2 = moving_x2.to(dtype).view(channel_groups, Cg).mean(1)
    return blocks(m1, Cg), blocks((m2 - m1 * m1).clamp_min(0.0), Cg)


def _gbgn_moments(
    io: NormInput, Gc: int, sizes: list[int], moving_x, moving_x2, factor, eps, sync, process_group
) -> Tensor:
    """Training from the per-``(n, c)`` moments, chunk by chunk (example groups of unequal sizes);
    normalization + affine in one pass. Each block's variance is pooled without cancellation
    (:func:`pooled_moments`, across processes with ``sync``)."""
    x3 = io.x3
    N, C, _ = x3.shape
    Cg = C // Gc
    # the authors' formulation: per (example, channel) moments over S, averaged over blocks
    m_nc, v_nc = row_moments(x3)
    m_nc, v_nc = m_nc.squeeze(2), v_nc.squeeze(2)
    ex2_nc = v_nc + m_nc * m_nc
    mus, variances = [], []
    for m_c, v_c in zip(torch.split(m_nc, sizes, 0), torch.split(v_nc, sizes, 0)):
        n_c = m_c.shape[0]
        m_b, v_b = m_c.reshape(1, n_c, Gc, Cg), v_c.reshape(1, n_c, Gc, Cg)
        mu, var, _ = pooled_moments(m_b, v_b, (1, 3), sync=sync, process_group=process_group)
        mus.append(mu.expand(1, n_c, Gc, Cg).reshape(n_c, C))
        variances.append(var.expand(1, n_c, Gc, Cg).reshape(n_c, C))
    mu = torch.cat(mus, 0) if len(mus) > 1 else mus[0]
    var = torch.cat(variances, 0) if len(variances) > 1 else variances[0]
    with torch.no_grad():
        (bm1, bm2), _ = reduce_mean([m_nc.detach(), ex2_nc.detach()], (0,), sync=sync, process_group=process_group)
        moving_x.lerp_(bm1.view(C).to(moving_x.dtype), factor)
        moving_x2.lerp_(bm2.view(C).to(moving_x2.dtype), factor)
    return normalize_affine(x3, mu.unsqueeze(2), var.unsqueeze(2), io.weight, io.bias, eps)
