"""Batch Group Norm: sets of contiguous groups of the flattened ``D = C*S`` over the batch
(docs/methods.md, section bgn)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..group_args import nearby_divisors
from .batch_norm import group_batch_norm, normalize_batch_sets
from .fused_ops import blocks, scale_shift
from .layout import NormInput, spatial_size
from .moments import check_set_size, synced_mean_var, update_running_stats
from .native import native_batch_norm


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
    per group over ``(N, D/G)`` (native batch norm on the view ``(N, G, D/G)``).
    Running statistics per group (shape ``(G,)``); per-channel affine. When ``G`` is a multiple
    of ``C`` every group lies in one channel and the affine is fused into the native call.
    Otherwise local training (no ``sync``) is the native batch norm over the groups and then the
    per-channel affine (:func:`~.batch_norm.group_batch_norm`); eval is one native
    eval-mode call on blocks of contiguous values each inside one group and one channel (whole
    channels when groups are whole channels) with each block's running statistics, and synced
    training normalizes the blocks with the all-reduced group statistics in one pass :func:`scale_shift`.
    """
    N, C = x.shape[0], x.shape[1]
    D = x.shape[1] * spatial_size(x)
    G = num_groups
    if D % G != 0:
        dims = "·".join(str(s) for s in x.shape[1:])
        names = "·".join(
            ("C", "L") if x.dim() == 3 else ("C", "H", "W") if x.dim() == 4 else ("C", "D", "H", "W")[: x.dim() - 1]
        )
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
        wg = None if w is None else blocks(w, r)
        bg = None if b is None else blocks(b, r)
        xv = io.x.reshape(N, G, Lg)
        if not training:  # the running statistics in the compute dtype (float32 buffers, float64 input)
            running_mean, running_var = running_mean.to(io.dtype), running_var.to(io.dtype)
        y = normalize_batch_sets(
            xv,
            running_mean,
            running_var,
            wg,
            bg,
            training=training,
            factor=factor,
            eps=eps,
            sync=sync,
            process_group=process_group,
        )
        return io.output(y)
    if training and not sync:
        return io.output(group_batch_norm(io.x, G, running_mean, running_var, w, b, factor, eps))
    # Blocks of L = gcd(S, D/G) contiguous values, each inside one group and one channel
    # (L = S: the channels themselves, any memory format; L = D/G when groups split channels).
    S = D // C
    L = math.gcd(S, Lg)
    K = D // L
    per_group, per_channel = Lg // L, S // L  # blocks per group / per channel
    if training:
        mean, var, count = synced_mean_var(io.x.reshape(N, G, Lg), (0, 2), process_group=process_group)
        update_running_stats(running_mean, running_var, mean, var, count, factor)
        scale, shift = _block_scale_shift(mean.view(G), var.view(G), w, b, per_group, per_channel, eps)
        xb = io.x.reshape(N, K, L)
        return io.output(scale_shift(xb, scale.view(1, K, 1), shift.view(1, K, 1)))
    # eval: one native pass with the running statistics of each block's group
    mean, var = blocks(running_mean.to(io.dtype), per_group), blocks(running_var.to(io.dtype), per_group)
    wk = None if w is None else blocks(w, per_channel)
    bk = None if b is None else blocks(b, per_channel)
    xv = io.x if L == S else io.x.reshape(N, K, L)
    return io.output(native_batch_norm(xv, mean, var, wk, bk, False, 0.0, eps))
