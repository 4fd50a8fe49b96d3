"""GhostNorm / Ghost BN: BN statistics per ghost batch (docs/methods.md, section ghost).

Fast path onto the native batch norm on the view ``(N/G_M, G_M*C, S)``; eval is BN's
(:func:`~.batch_norm.batch_norm`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch_norm import batch_norm
from .layout import NormInput, spatial_size
from .moments import check_set_size, needs_shift, synced_mean_var
from .native import native_batch_norm


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
