"""Methods whose sets lie within one example: GN, LN (one group), IN (one channel per group),
PN (the channels at one position), and SeqNorm, GN followed by GhostNorm
(docs/methods.md, sections gn, ln, in, pn, seqnorm). Fast paths: ``F.group_norm``,
``F.layer_norm``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..group_args import divisors
from .batch_sets import ghost_norm
from .layout import NormInput, spatial_size
from .moments import check_set_size


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = False
) -> Tensor:
    """Group Norm (Wu & He 2018): per ``(n, g)`` over ``(C/G, S)``, per-channel affine.

    ``training``: a set of one element (``C/G * S == 1``) is then an error (its output would be 0).
    """
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(
            f"GroupNorm num_groups={num_groups} must divide the number of channels C={C}; "
            f"valid choices: {divisors(C)}."
        )
    if training:
        S = spatial_size(x)
        check_set_size(
            (C // num_groups) * S,
            f"GroupNorm with num_groups={num_groups} on C={C} channels and S={S} position(s)",
            "Use fewer groups (num_groups) or an input with more positions.",
        )
    io = NormInput(x, weight, bias)
    return io.output(F.group_norm(io.x, num_groups, io.weight, io.bias, eps))


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Layer Norm for feature maps: per ``n`` over ``(C, S)``, per-channel affine (GN with G=1)."""
    return group_norm(x, 1, weight, bias, eps)


def instance_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = True
) -> Tensor:
    """Instance Norm (Ulyanov et al. 2016): per ``(n, c)`` over ``S`` (GN with G=C)."""
    if training:
        check_set_size(spatial_size(x), "InstanceNorm input", "InstanceNorm needs a spatial size S > 1.")
    return group_norm(x, x.shape[1], weight, bias, eps)


def positional_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Positional Norm (Li et al. 2019): per ``(n, s)`` over ``C``, per-channel affine."""
    io = NormInput(x, weight, bias)
    C = x.shape[1]
    # native layer_norm over the channel axis of the (N, S, C) transpose; its (C,) affine is ours
    y = F.layer_norm(io.x3.transpose(1, 2), (C,), io.weight, io.bias, eps)
    return io.output(y.transpose(1, 2))


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
    ghost stage.
    """
    io = NormInput(x)
    h = group_norm(io.x, channel_groups, None, None, eps=eps, training=training)
    y = ghost_norm(
        h,
        num_ghosts,
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
