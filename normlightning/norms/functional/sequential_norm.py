"""Sequential Normalization: GN without affine, then GhostNorm (docs/methods.md, section seqnorm)."""

from __future__ import annotations

import torch
from torch import Tensor

from .ghost_norm import check_ghost_batches, ghost_norm
from .layout import NormInput, spatial_size
from .moments import lerp_running
from .per_example import check_group_sets, group_norm
from .pooled_sets import Pooled, Stage, pooled_set_norm

#: Inputs smaller than this train SeqNorm with the two native kernels (GN, then ghost BN): the
#: fused node's fixed cost in small operations outweighs its one saved pass below about this size.
SEQNORM_FUSED_MIN_NUMEL = 1 << 18


def sequential_norm(
    x: Tensor,
    channel_groups: int,
    num_ghosts: int,
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
    """SeqNorm (Dimitriou & Arandjelovic 2022): ``Ghost_{G_M}(GroupNorm_{G_C}(x))``.

    The GN stage has no affine; the per-channel affine and running statistics live in the
    ghost stage. Local training with ``G_M`` dividing ``N`` on an input of at least
    :data:`SEQNORM_FUSED_MIN_NUMEL` values is one autograd node of two stages over
    ``(example, channel)`` rows (:func:`~.pooled_sets.pooled_set_norm`; the GN output is never
    stored); otherwise native GN, then :func:`ghost_norm` (two native kernels: fewer operations
    for small inputs, whose stored GN output costs little memory).
    """
    N, C = x.shape[0], x.shape[1]
    S, G = spatial_size(x), num_ghosts
    if not training or sync or N % G != 0 or x.numel() < SEQNORM_FUSED_MIN_NUMEL:
        io = NormInput(x)
        h = group_norm(io.x, channel_groups, None, None, eps=eps, training=training)
        y = ghost_norm(
            h,
            G,
            running_mean,
            running_var,
            weight,
            bias,
            training=training,
            factor=factor,
            eps=eps,
            sync=sync,
            process_group=process_group,
        )
        return io.output(y)
    check_group_sets(C, channel_groups, S)
    check_ghost_batches(N, G, S)
    io = NormInput(x, weight, bias)
    gn = Pooled((N, channel_groups, C // channel_groups), (2,))
    ghost = Pooled((N // G, G, C), (0,))  # ghost batch j: the examples n = j (mod G)
    stages = (Stage((gn,), (gn,)), Stage((ghost,), (ghost,)))
    out = pooled_set_norm(io.x.reshape(1, N * C, S), io.weight, io.bias, (N, 1), stages, eps)
    y, ((mean,), (var,)) = out.y, out.set_statistics[1]  # the ghost stage's set statistics
    n = (N // G) * S
    with torch.no_grad():  # PyTorch's update of the ghost statistics averaged over the ghost batches, one op for both
        lerp_running(
            (running_mean, running_var), (mean.view(G, C).mean(0), (var.view(G, C) * (n / (n - 1))).mean(0)), factor
        )
    return io.output(y)
