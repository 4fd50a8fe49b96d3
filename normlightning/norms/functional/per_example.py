"""Methods whose sets lie within one example: GN, LN (one group), IN (one channel per group),
PN (the channels at one position) and GN over the flattened ``C*S`` (gnflat) (docs/methods.md,
sections gn, gnflat, ln, in, pn). Fast paths: ``F.group_norm``, ``F.layer_norm``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..group_args import divisors, nearby_divisors
from .layout import NormInput, spatial_size
from .moments import check_set_size, needs_shift


def group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = False
) -> Tensor:
    """Group Norm (Wu & He 2018): per ``(n, g)`` over ``(C/G, S)``, per-channel affine.

    A set of one element (``C/G * S == 1``) is an error in training (its output would be the bias alone);
    at inference it is computed as written, ``x - mu = 0``: the bias, with zero input gradient, for any ``N``
    (torch's kernel refuses it when ``N = 1``).
    Native ``F.group_norm``; below float64, of the input shifted per set (:func:`_shifted_per_set`).
    """
    C = x.shape[1]
    if C % num_groups != 0:
        raise ValueError(
            f"GroupNorm num_groups={num_groups} must divide the number of channels C={C}; valid choices: {divisors(C)}."
        )
    if training:
        check_group_sets(C, num_groups, spatial_size(x))
    io = NormInput(x, weight, bias)
    if (C // num_groups) * spatial_size(x) == 1:  # inference on sets of one value: x - mu = x - x
        return io.output(_channel_affine(io.x - io.x, io.weight, io.bias))
    xs = _shifted_per_set(io.x, num_groups) if needs_shift(io.dtype) else io.x
    return io.output(F.group_norm(xs, num_groups, io.weight, io.bias, eps))


def _channel_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``weight_c y + bias_c`` for ``y (N, C, *)`` and ``(C,)`` parameters (either ``None``)."""
    view = (1, -1) + (1,) * (y.dim() - 2)
    y = y if weight is None else y * weight.view(view)
    return y if bias is None else y + bias.view(view)


def _shifted_per_set(x: Tensor, G: int) -> Tensor:
    """``x`` minus, per ``(n, g)`` set, the set's first value (detached): GN's output and gradients
    are those of ``x`` (a constant per set cancels in ``x - mu``), but the native float32 kernel,
    whose variance cancels on small sets far from 0 against their spread, sees values near 0, and
    a set of equal values exactly 0. One elementwise pass."""
    N, C = x.shape[0], x.shape[1]
    first = x.detach().reshape(N, C, -1)[:, :: C // G, :1]  # (N, G, 1)
    shift = first.unsqueeze(2).expand(N, G, C // G, 1).reshape((N, C) + (1,) * (x.dim() - 2))
    return x - shift


def flat_group_norm(
    x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = False
) -> Tensor:
    """Group Norm over the flattened ``D = C*S`` of each example (docs/methods.md, section gnflat).

    ``D`` (channel-major, ``d = c*S + s``) is cut into ``G`` contiguous groups of ``D/G``; per ``(n, g)``
    over its ``D/G`` values: ``y = gamma_c (x - mu_ng) / sqrt(var_ng + eps) + beta_c`` (biased variance).
    ``G`` dividing ``C`` is :func:`group_norm`; ``G > C`` cuts each channel into ``G/C`` bands of positions.
    Native ``F.group_norm`` on the view ``(N, G, D/G)``, then the per-channel affine. Sets of one value: an
    error in training, the bias at inference (as :func:`group_norm`).
    """
    N, C = x.shape[0], x.shape[1]
    D = C * spatial_size(x)
    if D % num_groups != 0:
        raise ValueError(
            f"FlatGroupNorm num_groups={num_groups} must divide D = C*S = {C}*{D // C} = {D}; "
            f"valid choices (divisors of {D}) near {num_groups}: {nearby_divisors(D, num_groups)}."
        )
    if training:
        check_set_size(D // num_groups, f"FlatGroupNorm with num_groups={num_groups} on D={D}", "Use fewer groups.")
    io = NormInput(x, weight, bias)
    if D == num_groups:  # inference on sets of one value: x - mu = x - x
        return io.output(_channel_affine(io.x - io.x, io.weight, io.bias))
    flat = io.x.reshape(N, num_groups, D // num_groups)
    if needs_shift(io.dtype):
        flat = flat - flat.detach()[:, :, :1]  # the reason of _shifted_per_set
    y = F.group_norm(flat, num_groups, eps=eps).reshape(N, C, -1)
    if io.weight is not None:
        y = y * io.weight[:, None]
    if io.bias is not None:
        y = y + io.bias[:, None]
    return io.output(y)


def check_group_sets(C: int, G: int, S: int) -> None:
    check_set_size(
        (C // G) * S,
        f"GroupNorm with num_groups={G} on C={C} channels and S={S} position(s)",
        "Use fewer groups (num_groups) or an input with more positions.",
    )


def layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = False
) -> Tensor:
    """Layer Norm for feature maps: per ``n`` over ``(C, S)``, per-channel affine (GN with G=1)."""
    if training and x.shape[1] * spatial_size(x) < 2:
        raise ValueError("LayerNorm: a set of one element (C * S == 1) in training; use C * S > 1.")
    return group_norm(x, 1, weight, bias, eps)


def instance_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = True
) -> Tensor:
    """Instance Norm (Ulyanov et al. 2016): per ``(n, c)`` over ``S`` (GN with G=C)."""
    if training:
        check_set_size(spatial_size(x), "InstanceNorm input", "InstanceNorm needs a spatial size S > 1.")
    return group_norm(x, x.shape[1], weight, bias, eps)


def positional_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = False
) -> Tensor:
    """Positional Norm (Li et al. 2019): per ``(n, s)`` over ``C``, per-channel affine.

    Native ``layer_norm`` over the channel axis of the ``(N, S, C)`` transposed view, whose
    ``(C,)`` affine is ours (a view of a channels-last input; copied for a contiguous one). At one
    position ``(N, C)`` itself: a transposed ``(N, C, 1, 1)`` output or gradient would have channel
    stride 1, which convolutions read as channels-last and answer by converting their weight.
    Below float64 the input is first shifted by its channel-0 value at each position (detached; the
    reason of :func:`_shifted_per_set`).
    """
    if training and x.shape[1] < 2:
        raise ValueError(
            "PositionalNorm: a set of one element (C == 1) in training; PN normalizes over channels, use C > 1."
        )
    io = NormInput(x, weight, bias)
    N, C = x.shape[0], x.shape[1]
    xs = io.x - io.x.detach()[:, :1] if needs_shift(io.dtype) else io.x
    if spatial_size(x) == 1:
        return io.output(F.layer_norm(xs.reshape(N, C), (C,), io.weight, io.bias, eps))
    return io.output(F.layer_norm(xs.reshape(N, C, -1).transpose(1, 2), (C,), io.weight, io.bias, eps).transpose(1, 2))
