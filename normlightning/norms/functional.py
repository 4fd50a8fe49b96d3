"""The math of every normalization method, written once as pure functions.

Every batch-statistic method is "normalize ``x`` over a set". The layer modules in this
package are thin shells that own parameters and buffers and call these functions.

Conventions (see ``METHODS.md``):

* ``x`` has shape ``(N, C, *spatial)``; ``S`` is the product of the spatial sizes (1 for
  ``(N, C)`` input). Internally inputs are viewed as ``(N, C, S)``.
* Normalization uses the **biased** variance of a set, ``eps`` inside the square root.
* The affine ``gamma_c, beta_c`` is always **per channel**, applied after normalizing with the
  set-shaped statistics (fused into the native kernel where the shapes allow it).
* Running statistics follow PyTorch: ``r <- (1 - f) r + f b`` with ``f`` the *momentum factor*
  (``momentum``, or ``1 / num_batches_tracked`` for a cumulative average; the layer computes
  it), and the running variance receives the **unbiased** batch variance (``n / (n - 1)``).
* float16 / bfloat16 inputs are computed in float32 and the output is cast back to the
  input's dtype. Any variance obtained as ``E[x^2] - E[x]^2`` is clamped at 0.

Fast paths onto native kernels: ``F.batch_norm`` on a reshaped view gives BN, Ghost (the view
``(N/G_M, G_M*C, S)``), BGN (the view ``(N, G, D/G)``); ``F.group_norm`` gives GN, LN and IN.

Synchronized statistics (``sync=True``): statistics of sets that include the batch axis are
computed from moments (sum, sum of squares, count) that are all-reduced across
``process_group`` with the differentiable ``torch.distributed.nn.functional.all_reduce``. When
``torch.distributed`` is not initialized the same moments path runs locally (a world of one);
the result equals the native fast path up to rounding.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .group_args import divisors, nearby_divisors

__all__ = [
    "compute_dtype",
    "set_mean_var",
    "row_moments",
    "combine_moments",
    "reduce_mean",
    "update_running_stats",
    "batch_norm",
    "ghost_norm",
    "batch_group_norm",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "positional_norm",
    "sequential_norm",
    "general_batch_group_norm",
    "example_weighted_norm",
    "heterologous_norm",
    "switchable_norm",
    "batch_renorm",
    "weight_standardize",
    "parse_set_spec",
    "divisors",
    "nearby_divisors",
    "chunk_sizes",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def _as3d(x: Tensor) -> Tensor:
    """View ``(N, C, *spatial)`` as ``(N, C, S)``."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _affine(y3: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Per-channel affine on a ``(N, C, S)`` tensor."""
    if weight is None and bias is None:
        return y3
    if weight is None:
        return y3 + bias.view(1, -1, 1)
    if bias is None:
        return y3 * weight.view(1, -1, 1)
    return _fma(y3, weight.view(1, -1, 1), bias.view(1, -1, 1))


def _fma(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x * a + b`` (broadcasting). A multiply and an in-place add: on CPU ``torch.addcmul`` with
    broadcast operands is 2-2.5x slower than the two passes together."""
    y = x * a
    if torch.broadcast_shapes(y.shape, b.shape) != y.shape:
        return y + b
    return y.add_(b)


def _normalize_affine(x3: Tensor, mu: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``gamma_c (x - mu) / sqrt(var + eps) + beta_c`` on ``(N, C, S)`` with ``mu``/``var`` of shape
    ``(N|1, C, 1)``, as one full-size pass ``x * scale + shift`` (scale/shift are statistic-sized)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1)
    shift = -mu * scale
    if bias is not None:
        shift = shift + bias.view(1, -1, 1)
    return scale_shift(x3, scale, shift)


def chunk_sizes(n: int, k: int) -> list[int]:
    """Sizes of ``k`` nearly equal chunks of ``n`` items (first ``n % k`` are one larger)."""
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def _check_set_size(size: int, what: str, fix: str) -> None:
    if size < 2:
        raise ValueError(
            f"{what} has {size} element(s) per normalization set in training; a set needs more "
            f"than 1 value (its variance is undefined). {fix}"
        )


# --------------------------------------------------------------------------------------
# statistics over sets
# --------------------------------------------------------------------------------------
def _allreduce_active(sync: bool) -> bool:
    return bool(sync) and torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_mean(
    tensors: Sequence[Tensor], dims: Sequence[int], *, sync: bool = False, process_group=None
) -> tuple[list[Tensor], Tensor | int]:
    """Means of each tensor over ``dims`` (keepdim), and the element count per set.

    With ``sync`` and an initialized process group the sums and counts are all-reduced
    (differentiably) across ``process_group``, so the means are over the union of the
    processes' sets. Returns ``(means, count)``; ``count`` is an int or a 0-d tensor.
    """
    ref = tensors[0]
    count = 1
    for d in dims:
        count *= ref.shape[d]
    sums = [t.sum(dim=tuple(dims), keepdim=True) for t in tensors]
    if not _allreduce_active(sync):
        return [s / count for s in sums], count
    from torch.distributed.nn.functional import all_reduce

    shape = sums[0].shape
    flat = torch.cat([s.reshape(-1) for s in sums] + [sums[0].new_full((1,), float(count))])
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    with warnings.catch_warnings():
        # deprecated in favour of _functional_collectives, whose all_reduce is not differentiable
        warnings.simplefilter("ignore", FutureWarning)
        flat = all_reduce(flat, group=group)
    total = flat[-1]
    numel = sums[0].numel()
    means = [flat[i * numel : (i + 1) * numel].view(shape) / total for i in range(len(sums))]
    return means, total


class _RowMoments(torch.autograd.Function):
    """``x -> (mean, biased var)`` over the last dim, with a one-pass fused backward
    ``dx = a * x + b`` (``a = 2 g_var / L``, ``b = g_mean / L - a * mean``, per row)."""

    @staticmethod
    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = x.mean(-1, keepdim=True)
        # one full-size temporary, squared in place (vecdot would allocate a second one)
        var = (x - mean).square_().sum(-1, keepdim=True) / x.shape[-1]
        return mean, var

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], output[0])

    @staticmethod
    def backward(ctx, g_mean: Tensor | None, g_var: Tensor | None) -> Tensor:
        x, mean = ctx.saved_tensors
        L = x.shape[-1]
        if g_var is None:
            return (g_mean / L).expand_as(x)
        a = g_var * (2.0 / L)
        b = -a * mean if g_mean is None else g_mean / L - a * mean
        return _fma(x, a, b)


class _ScaleShift(torch.autograd.Function):
    """``y = x * scale + shift`` on ``(..., L)`` with statistic-sized ``scale``/``shift``
    (broadcast over ``L``), with a lean backward: ``dx = g * scale``, ``dscale = sum_L g x``,
    ``dshift = sum_L g`` (reduced to their shapes). At most one full-size temporary is live at a
    time (on CPU a second concurrent one can cost more than the arithmetic: fresh pages)."""

    @staticmethod
    def forward(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return _fma(x, scale, shift)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, scale, shift = inputs
        ctx.save_for_backward(x, scale)
        ctx.shift_shape = shift.shape

    @staticmethod
    def backward(ctx, g: Tensor):
        x, scale = ctx.saved_tensors
        gx = gscale = gshift = None
        if ctx.needs_input_grad[1]:
            gx_full = g * x  # freed before gx is allocated: one full-size buffer live at a time
            gscale = gx_full.sum(-1, keepdim=True).sum_to_size(scale.shape)
            del gx_full
        if ctx.needs_input_grad[2]:
            gshift = g.sum(-1, keepdim=True).sum_to_size(ctx.shift_shape)
        if ctx.needs_input_grad[0]:
            gx = g * scale
        return gx, gscale, gshift


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
        mean, var = _RowMoments.forward(x.reshape(N, G, per_group * L))  # no grad needed here
        mean, var = combine_moments(mean, var, (0,))
        mean, var = mean.view(G), var.view(G)
        rstd = torch.rsqrt(var + eps)
        scale = _blocks(rstd, per_group)
        if weight is not None:
            scale = scale * _blocks(weight, per_channel)
        shift = -_blocks(mean, per_group) * scale
        if bias is not None:
            shift = shift + _blocks(bias, per_channel)
        y = _fma(x, scale.view(1, K, 1), shift.view(1, K, 1))
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
        mb, vb = _blocks(mean, per_group), _blocks(var, per_group)
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
            gam = None if weight is None else _blocks(weight, per_channel)
            t1, t2 = (s_g, s_gx) if gam is None else (s_g * gam, s_gx * gam)
            n = N * per_group * L
            m1 = t1.view(G, per_group).sum(1) / n  # mean_set(dxhat)
            m2 = t2.view(G, per_group).sum(1) / n  # mean_set(dxhat * xhat)
            rb = _blocks(rstd, per_group)
            a = rb if gam is None else rb * gam
            bco = -rstd * rstd * m2
            c = -rstd * m1 - bco * mean
            b_, c_ = _blocks(bco, per_group), _blocks(c, per_group)
            gx = g * a.view(1, K, 1)
            gx.addcmul_(x, b_.view(1, K, 1)).add_(c_.view(1, K, 1))
        return gx, gw, gb, None, None, None


def _blocks(t: Tensor, r: int) -> Tensor:
    """Repeat each entry of the 1-d ``t`` ``r`` times (``repeat_interleave``, without its index
    computation: a broadcast copy). Always a real, contiguous tensor: for a 1-element ``t`` a
    plain ``reshape`` of the expansion would be a stride-0 view, which native kernels (the
    batch-norm backward among them) read through a raw pointer as if it were dense."""
    return t if r == 1 else t.unsqueeze(1).expand(-1, r).contiguous().view(-1)


def row_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over its last dim (keepdim), shapes ``(*, 1)``.

    Two passes of fast native reductions: the mean, then the centred sum of squares as an
    inner product (``linalg.vecdot``), so there is no ``E[x^2] - E[x]^2`` cancellation.
    (On CPU ``torch.var_mean`` is a slow Welford kernel, several times a whole BatchNorm.)
    The backward is one fused pass (see ``_RowMoments``).
    """
    return _RowMoments.apply(x)


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` as one fused pass, ``scale``/``shift`` of shape ``(*, 1)``
    broadcasting against ``x (..., L)``; lean backward (see ``_ScaleShift``)."""
    return _ScaleShift.apply(x, scale, shift)


def combine_moments(mean: Tensor, var: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pool equal-size sets: the mean and biased variance of the union over ``dims`` (keepdim).

    Law of total variance: ``mu = avg(m_k)``, ``var = avg(v_k) + avg((m_k - mu)^2)`` (both
    terms >= 0, no cancellation). ``mean``/``var`` are per-set statistics of sets that all have
    the same number of elements.
    """
    dims = tuple(dims)
    if not dims:
        return mean, var
    mu = mean.mean(dim=dims, keepdim=True)
    dm = mean - mu
    return mu, var.mean(dim=dims, keepdim=True) + (dm * dm).mean(dim=dims, keepdim=True)


def _local_mean_var(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` (keepdim) without communication: the trailing
    reduced axes are flattened into rows (:func:`row_moments`), the other reduced axes pooled
    with :func:`combine_moments`."""
    nd = x.dim()
    dims = sorted({d % nd for d in dims})
    k = nd
    while k - 1 in dims:
        k -= 1
    if k == nd:  # no trailing axis is reduced
        var, mean = torch.var_mean(x, dim=tuple(dims), correction=0, keepdim=True)
        return mean, var
    mean, var = row_moments(x.reshape(*x.shape[:k], -1))
    mean, var = combine_moments(mean, var, [d for d in dims if d < k])
    shape = [1 if d in dims else x.shape[d] for d in range(nd)]
    return mean.reshape(shape), var.reshape(shape)


def set_mean_var(
    x: Tensor, dims: Sequence[int], *, sync: bool = False, process_group=None
) -> tuple[Tensor, Tensor, Tensor | int]:
    """Mean and biased variance of ``x`` over ``dims`` (keepdim), and the set size.

    Local path: :func:`row_moments` over the trailing reduced axes, pooled over the others
    with the law of total variance (numerically stable). Sync path (``sync=True``): the moments
    ``E[x]`` and ``E[x^2]`` are (all-)reduced and ``var = max(E[x^2] - E[x]^2, 0)``.
    """
    if not sync:
        mean, var = _local_mean_var(x, dims)
        count = 1
        for d in dims:
            count *= x.shape[d]
        return mean, var, count
    (mean, ex2), count = reduce_mean([x, x * x], dims, sync=True, process_group=process_group)
    var = (ex2 - mean * mean).clamp_min(0.0)
    return mean, var, count


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count,
    factor: float,
) -> None:
    """PyTorch's update: ``r <- (1-f) r + f b``; the variance gets ``var * n / (n - 1)``.

    ``mean``/``var`` are the batch statistics (``var`` biased) of shape broadcastable to the
    buffers' shape; ``count`` is the set size ``n``.
    """
    if running_mean is not None:
        running_mean.lerp_(mean.detach().reshape(running_mean.shape).to(running_mean.dtype), factor)
    if running_var is not None:
        unbiased = var.detach().reshape(running_var.shape) * (count / (count - 1))
        running_var.lerp_(unbiased.to(running_var.dtype), factor)


def _normalize_batch_sets(
    x3: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float,
    eps: float,
    sync: bool,
    process_group,
) -> Tensor:
    """Normalize a ``(N, K, L)`` view per ``k`` over ``(N, L)``; weight/bias of shape ``(K,)``.

    Training: batch statistics, running buffers (shape ``(K,)``) updated. Eval: running stats.
    Native ``F.batch_norm`` unless ``sync`` (moments path, see module doc).
    """
    if not training or not sync:
        return F.batch_norm(x3, running_mean, running_var, weight, bias, training, factor, eps)
    mean, var, count = set_mean_var(x3, (0, 2), sync=True, process_group=process_group)
    update_running_stats(running_mean, running_var, mean, var, count, factor)
    y = (x3 - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y


# --------------------------------------------------------------------------------------
# BN and inference example weighing
# --------------------------------------------------------------------------------------
def example_weighted_norm(
    x3: Tensor,
    pop_mean: Tensor,
    pop_ex2: Tensor,
    alpha: float,
    eps: float,
) -> Tensor:
    """Inference example weighing (Summers & Dinneen, "Four Things", METHODS.md).

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
        n = x.shape[0] * (x[0, 0].numel())
        _check_set_size(n, "BatchNorm input", "Use a batch of more than one example (N * S > 1).")
    xc = _upcast(x)
    w, b = _param(weight, xc.dtype), _param(bias, xc.dtype)
    if not training and alpha != 0.0:
        x3 = _as3d(xc)
        pop_ex2 = running_var.to(xc.dtype) + running_mean.to(xc.dtype) ** 2
        y = _affine(example_weighted_norm(x3, running_mean.to(xc.dtype), pop_ex2, alpha, eps), w, b)
        return y.view(x.shape).to(x.dtype)
    if sync and training:
        y = _normalize_batch_sets(_as3d(xc), running_mean, running_var, w, b, True, factor, eps, True, process_group)
        return y.view(x.shape).to(x.dtype)
    return F.batch_norm(xc, running_mean, running_var, w, b, training, factor, eps).to(x.dtype)


# --------------------------------------------------------------------------------------
# Ghost / Sequential norm
# --------------------------------------------------------------------------------------
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
    one more example. ``N < G_M`` or a ghost set of one element is an error.

    Running statistics (per channel) are updated once per forward with the mean of the ghost
    batches' means and the mean of their unbiased variances. Eval: as BN (with ``alpha``).
    """
    if not training:
        return batch_norm(x, running_mean, running_var, weight, bias, False, factor, eps, alpha)
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    G = num_ghosts
    if N < G:
        raise ValueError(
            f"GhostNorm cannot split a batch of N={N} examples into num_groups (G_M)={G} ghost "
            f"batches. Use a batch of at least {G} examples (e.g. drop_last=True in the loader) "
            f"or a smaller num_groups / larger ghost_batch_size."
        )
    _check_set_size(
        (N // G) * S,
        f"GhostNorm with N={N}, G_M={G}, S={S}",
        "Use fewer ghost batches (num_groups) or larger ghost batches (ghost_batch_size).",
    )
    xc = _upcast(x)
    x3 = _as3d(xc)
    w, b = _param(weight, xc.dtype), _param(bias, xc.dtype)
    if N % G == 0:
        xv = x3.reshape(N // G, G * C, S)
        y, means, uvars = _ghost_pass(xv, G, w, b, eps, sync, process_group)
        y = y.reshape(x.shape)
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
        y = torch.cat(ys, 0)[inverse].reshape(x.shape)
        means, uvars = torch.cat(ms, 0), torch.cat(vs, 0)
    with torch.no_grad():
        running_mean.lerp_(means.mean(0).to(running_mean.dtype), factor)
        running_var.lerp_(uvars.mean(0).to(running_var.dtype), factor)
    return y.to(x.dtype)


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
        y = F.batch_norm(xv, tmp_mean, tmp_var, wk, bk, True, 1.0, eps)
        return y, tmp_mean.view(G, C), tmp_var.view(G, C)
    mean, var, count = set_mean_var(xv, (0, 2), sync=True, process_group=process_group)
    y = (xv - mean) * torch.rsqrt(var + eps)
    if wk is not None:
        y = y * wk.view(1, -1, 1)
    if bk is not None:
        y = y + bk.view(1, -1, 1)
    with torch.no_grad():
        uvar = var.detach() * (count / (count - 1))
    return y, mean.detach().view(G, C), uvar.view(G, C)


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
        S = x[0, 0].numel()
        _check_set_size(
            (C // num_groups) * S,
            f"GroupNorm with num_groups={num_groups} on C={C} channels and S={S} position(s)",
            "Use fewer groups (num_groups) or an input with more positions.",
        )
    xc = _upcast(x)
    return F.group_norm(xc, num_groups, _param(weight, xc.dtype), _param(bias, xc.dtype), eps).to(x.dtype)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Layer Norm for feature maps: per ``n`` over ``(C, S)``, per-channel affine (GN with G=1)."""
    return group_norm(x, 1, weight, bias, eps)


def instance_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5, training: bool = True
) -> Tensor:
    """Instance Norm (Ulyanov et al. 2016): per ``(n, c)`` over ``S`` (GN with G=C)."""
    if training:
        _check_set_size(x[0, 0].numel(), "InstanceNorm input", "InstanceNorm needs a spatial size S > 1.")
    return group_norm(x, x.shape[1], weight, bias, eps)


def positional_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Positional Norm (Li et al. 2019): per ``(n, s)`` over ``C``, per-channel affine."""
    xc = _upcast(x)
    x3 = _as3d(xc)
    C = x3.shape[1]
    # native layer_norm over the channel axis of the (N, S, C) transpose; its (C,) affine is ours
    y = F.layer_norm(x3.transpose(1, 2), (C,), _param(weight, xc.dtype), _param(bias, xc.dtype), eps)
    return y.transpose(1, 2).reshape(x.shape).to(x.dtype)


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
    h = group_norm(_upcast(x), channel_groups, None, None, eps, training)
    y = ghost_norm(h, num_ghosts, running_mean, running_var, weight, bias, training, factor, eps, 0.0, sync, process_group)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------
# BGN
# --------------------------------------------------------------------------------------
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
        _check_set_size(N * (D // G), f"BatchGroupNorm with N={N}, D/G={D // G}", "Use a larger batch or fewer groups.")
    xc = _upcast(x)
    dt = xc.dtype
    w, b = _param(weight, dt), _param(bias, dt)
    Lg = D // G
    xv = xc.reshape(N, G, Lg)
    if G % C == 0:
        # every group lies in one channel: the affine is the native kernel's per-"channel" one
        r = G // C
        wg = None if w is None else w.repeat_interleave(r)
        bg = None if b is None else b.repeat_interleave(r)
        y = _normalize_batch_sets(xv, running_mean, running_var, wg, bg, training, factor, eps, sync, process_group)
        return y.view(x.shape).to(x.dtype)
    # Group statistics once, then normalization and the per-channel affine as one pass
    # x * scale + shift over blocks of L = gcd(S, D/G) contiguous values, each inside one group
    # and one channel (L = S when groups are whole channels, L = D/G when channels split).
    S = D // C
    L = math.gcd(S, Lg)
    K = D // L
    per_group, per_channel = Lg // L, S // L  # blocks per group / per channel
    if training and not sync:
        # one autograd node: fused statistics + normalize + affine, fused backward
        y, mean, var = _BlockSetNorm.apply(xc.reshape(N, K, L), w, b, per_group, per_channel, eps)
        update_running_stats(running_mean, running_var, mean, var, N * Lg, factor)
        return y.view(x.shape).to(x.dtype)
    if training:
        mean, var, count = set_mean_var(xv, (0, 2), sync=sync, process_group=process_group)
        update_running_stats(running_mean, running_var, mean, var, count, factor)
        mean, var = mean.view(G), var.view(G)
    else:
        mean, var = running_mean.to(dt), running_var.to(dt)
    scale = _blocks(torch.rsqrt(var + eps), per_group)
    if w is not None:
        scale = scale * _blocks(w, per_channel)
    shift = -_blocks(mean, per_group) * scale
    if b is not None:
        shift = shift + _blocks(b, per_channel)
    y = scale_shift(xc.reshape(N, K, L), scale.view(1, K, 1), shift.view(1, K, 1))
    return y.view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------
# GBGN (Four Things)
# --------------------------------------------------------------------------------------
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
    """
    N, C = x.shape[0], x.shape[1]
    S = x[0, 0].numel()
    Gc = channel_groups
    Cg = C // Gc
    xc = _upcast(x)
    x3 = _as3d(xc)
    w, b = _param(weight, xc.dtype), _param(bias, xc.dtype)
    if not training:
        m1 = moving_x.to(xc.dtype).view(Gc, Cg).mean(1)
        m2 = moving_x2.to(xc.dtype).view(Gc, Cg).mean(1)
        xg = x3.reshape(N, Gc, Cg * S)
        if alpha != 0.0:
            yg = example_weighted_norm(xg, m1, m2, alpha, eps)
        else:
            var = (m2 - m1 * m1).clamp_min(0.0)
            yg = (xg - m1.view(1, Gc, 1)) * torch.rsqrt(var + eps).view(1, Gc, 1)
        return _affine(yg.reshape(N, C, S), w, b).view(x.shape).to(x.dtype)
    E = N if examples_per_group is None else examples_per_group
    k = -(-N // E)
    sizes = chunk_sizes(N, k)
    _check_set_size(
        min(sizes) * Cg * S,
        f"GeneralBatchGroupNorm with N={N}, examples_per_group={E}, C/G_C={Cg}, S={S}",
        "Use more examples per group or fewer channel groups.",
    )
    # the authors' formulation: per (example, channel) moments over S, averaged over blocks
    m_nc, v_nc = row_moments(x3)
    m_nc, v_nc = m_nc.squeeze(2), v_nc.squeeze(2)
    ex2_nc = v_nc + m_nc * m_nc
    mus, variances = [], []
    for m_c, e_c in zip(torch.split(m_nc, sizes, 0), torch.split(ex2_nc, sizes, 0)):
        n_c = m_c.shape[0]
        (mu, ex2), _ = reduce_mean(
            [m_c.reshape(1, n_c, Gc, Cg), e_c.reshape(1, n_c, Gc, Cg)], (1, 3), sync=sync, process_group=process_group
        )
        mus.append(mu.expand(1, n_c, Gc, Cg).reshape(n_c, C))
        variances.append((ex2 - mu * mu).clamp_min(0.0).expand(1, n_c, Gc, Cg).reshape(n_c, C))
    mu = torch.cat(mus, 0) if len(mus) > 1 else mus[0]
    var = torch.cat(variances, 0) if len(variances) > 1 else variances[0]
    with torch.no_grad():
        (bm1, bm2), _ = reduce_mean([m_nc.detach(), ex2_nc.detach()], (0,), sync=sync, process_group=process_group)
        moving_x.lerp_(bm1.view(C).to(moving_x.dtype), factor)
        moving_x2.lerp_(bm2.view(C).to(moving_x2.dtype), factor)
    return _normalize_affine(x3, mu.unsqueeze(2), var.unsqueeze(2), w, b, eps).view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------
# HN (Heterologous Normalization)
# --------------------------------------------------------------------------------------
_SET_KINDS = ("bn", "in", "ln", "gn", "en")


def parse_set_spec(spec: str, num_channels: int, *, allow_mixture: bool, role: str) -> list[tuple[str, int]]:
    """Parse an HN set spec such as ``"bn"``, ``"gn:8"``, ``"en:1"`` or ``"bn+in+ln"``.

    Returns a list of ``(kind, groups)`` with ``groups`` the number of channel groups of the set:
    ``bn`` -> ``("en", C)`` is *not* rewritten (kept as ``("bn", C)``), ``in`` -> ``("in", C)``,
    ``ln`` -> ``("ln", 1)``, ``gn:G`` -> ``("gn", G)``, ``en:G`` -> ``("en", G)``.
    Raises ``ValueError`` naming the bad part and the valid syntax.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"HeterologousNorm {role}={spec!r}: expected a set name such as 'bn', 'en:1', 'gn:8'.")
    parts = [p.strip().lower() for p in spec.split("+")]
    if len(parts) > 1 and not allow_mixture:
        raise ValueError(f"HeterologousNorm {role}={spec!r}: a mixture ('+') is only allowed for the std set.")
    if len(set(parts)) != len(parts):
        raise ValueError(f"HeterologousNorm {role}={spec!r}: a set is listed twice.")
    out = []
    valid = "valid sets: bn, in, ln, gn:G, en:G (G divides C), joined by '+' for std mixtures"
    for p in parts:
        name, _, arg = p.partition(":")
        if name not in _SET_KINDS:
            raise ValueError(f"HeterologousNorm {role}={spec!r}: unknown set {p!r}; {valid}.")
        if name in ("gn", "en"):
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"HeterologousNorm {role}={spec!r}: {name!r} needs a group count, e.g. '{name}:8'; {valid}.")
            g = int(arg)
            if num_channels % g != 0:
                raise ValueError(
                    f"HeterologousNorm {role}={spec!r}: {name}:{g} needs G dividing C={num_channels}; "
                    f"valid choices: {divisors(num_channels)}."
                )
        else:
            if arg:
                raise ValueError(f"HeterologousNorm {role}={spec!r}: {name!r} takes no ':' argument; {valid}.")
            g = {"bn": num_channels, "in": num_channels, "ln": 1}[name]
        out.append((name, g))
    return out


def is_batch_set(kind: str) -> bool:
    """Whether an HN set includes the batch axis (``bn``, ``en:G``)."""
    return kind in ("bn", "en")


def _set_stats(x3: Tensor, kind: str, groups: int, sync: bool, process_group, nc_moments):
    """Mean/var/count of an HN set on ``x3 (N, C, S)``; stats shaped ``(N|1, G, 1, 1)``.

    Every HN set is a union of whole ``(n, c)`` rows, so locally its statistics are pooled
    (:func:`combine_moments`) from the per-``(n, c)`` moments ``nc_moments()`` (computed once,
    shared by the mean set and every std set). Synced batch sets use the moments path.
    """
    N, C, S = x3.shape
    batch = is_batch_set(kind)
    if sync and batch:
        return set_mean_var(x3.reshape(N, groups, C // groups, S), (0, 2, 3), sync=True, process_group=process_group)
    m_nc, v_nc = nc_moments()
    dims = (0, 2) if batch else (2,)
    m, v = combine_moments(m_nc.reshape(N, groups, C // groups), v_nc.reshape(N, groups, C // groups), dims)
    return m.unsqueeze(-1), v.unsqueeze(-1), (N if batch else 1) * (C // groups) * S


def _per_channel(t: Tensor, C: int) -> Tensor:
    """``(B, G, 1, 1)`` group statistics -> ``(B, C, 1)`` per channel."""
    B, G = t.shape[0], t.shape[1]
    return t.reshape(B, G, 1).repeat_interleave(C // G, dim=1) if G != C else t.reshape(B, C, 1)


def heterologous_norm(
    x: Tensor,
    mean_set: tuple[str, int],
    std_sets: Sequence[tuple[str, int]],
    std_mix_logits: Tensor | None,
    running_mean: Tensor | None,
    running_vars: Sequence[Tensor | None],
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Heterologous Normalization: ``x_hat = (x - mu_S) / sqrt(var_S' + eps)``.

    ``var_S'`` is the variance of the elements of ``S'`` about ``S'``'s own mean; a std mixture
    uses ``var = sum_k softmax(std_mix_logits)_k var_k``. Batch sets (``bn``: per channel,
    ``en:G``: per channel group) use batch statistics in training and their running buffers
    (``running_mean`` for the mean set, ``running_vars[k]`` for std component ``k``; ``None``
    for per-example sets) at inference; per-example sets are computed from the input.
    """
    xc = _upcast(x)
    x3 = _as3d(xc)
    N, C, S = x3.shape
    dt = xc.dtype
    cache: list[tuple[Tensor, Tensor]] = []

    def nc_moments() -> tuple[Tensor, Tensor]:
        if not cache:
            cache.append(row_moments(x3))
        return cache[0]

    # mean
    kind, g = mean_set
    if is_batch_set(kind) and not training:
        mu = _per_channel(running_mean.to(dt).view(1, g, 1, 1), C)
    else:
        m, v, n = _set_stats(x3, kind, g, sync, process_group, nc_moments)
        mu = _per_channel(m, C)
        if training and is_batch_set(kind):
            update_running_stats(running_mean, None, m, v, n, factor)
    # std
    var = None
    weights = None if std_mix_logits is None else torch.softmax(std_mix_logits.to(dt), 0)
    for k, (skind, sg) in enumerate(std_sets):
        if is_batch_set(skind) and not training:
            vk = running_vars[k].to(dt).view(1, sg, 1, 1)
        else:
            m, vk, n = _set_stats(x3, skind, sg, sync, process_group, nc_moments)
            if training and is_batch_set(skind):
                update_running_stats(None, running_vars[k], m, vk, n, factor)
        vk = _per_channel(vk, C)
        if weights is not None:
            vk = weights[k] * vk
        var = vk if var is None else var + vk
    y = _normalize_affine(x3, mu, var, _param(weight, dt), _param(bias, dt), eps)
    return y.view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------
# SN (Switchable Normalization)
# --------------------------------------------------------------------------------------
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
    """Switchable Normalization (Luo et al. 2019), the official code's math.

    Per ``(n, c)``: ``mu_in, var_in`` over ``S`` (biased); ``mu_ln = mean_c mu_in``,
    ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; ``mu_bn = mean_n mu_in``,
    ``var_bn = mean_n(var_in + mu_in^2) - mu_bn^2`` (both clamped at 0). Mixed with
    ``softmax(mean_logits)`` / ``softmax(var_logits)`` over (IN, LN, BN). Running stats for the
    BN term only (eval uses them for that term).
    """
    if training:
        _check_set_size(x.shape[0] * x[0, 0].numel(), "SwitchableNorm input (BN term)", "Use a batch with N * S > 1.")
    xc = _upcast(x)
    x3 = _as3d(xc)
    dt = xc.dtype
    N, C, S = x3.shape
    mu_in, var_in = row_moments(x3)
    temp = var_in + mu_in * mu_in
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (temp.mean(1, keepdim=True) - mu_ln * mu_ln).clamp_min(0.0)
    if training:
        (mu_bn, t_bn), n_ex = reduce_mean([mu_in, temp], (0,), sync=sync, process_group=process_group)
        var_bn = (t_bn - mu_bn * mu_bn).clamp_min(0.0)
        update_running_stats(running_mean, running_var, mu_bn, var_bn, n_ex * S, factor)
    else:
        mu_bn = running_mean.to(dt).view(1, C, 1)
        var_bn = running_var.to(dt).view(1, C, 1)
    wm = torch.softmax(mean_logits.to(dt), 0)
    wv = torch.softmax(var_logits.to(dt), 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = _normalize_affine(x3, mu, var, _param(weight, dt), _param(bias, dt), eps)
    return y.view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------
# BRN (Batch Renormalization)
# --------------------------------------------------------------------------------------
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
) -> Tensor:
    """Batch Renormalization (Ioffe 2017).

    ``r = sg(clip(sigma_B / sigma_run, 1/r_max, r_max))``,
    ``d = sg(clip((mu_B - mu_run) / sigma_run, -d_max, d_max))``,
    ``x_hat = (x - mu_B) / sigma_B * r + d``, ``y = gamma x_hat + beta`` with
    ``sigma = sqrt(var + eps)``; ``r, d`` use the running statistics *before* this step's
    update. Since ``gamma (x_hat_BN r + d) + beta = x_hat_BN (gamma r) + (gamma d + beta)``, the
    output is one native batch-norm call with weight ``gamma r`` and bias ``gamma d + beta``.
    Eval: BN with the running statistics.
    """
    if not training:
        return batch_norm(x, running_mean, running_var, weight, bias, False, factor, eps)
    _check_set_size(x.shape[0] * x[0, 0].numel(), "BatchRenorm input", "Use a batch with N * S > 1.")
    xc = _upcast(x)
    dt = xc.dtype
    x3 = _as3d(xc)
    with torch.no_grad():
        mean, var, _ = set_mean_var(x3.detach(), (0, 2), sync=sync, process_group=process_group)
        sigma_b = torch.sqrt(var.view(-1) + eps)
        sigma_r = torch.sqrt(running_var.to(dt) + eps)
        r = (sigma_b / sigma_r).clamp(1.0 / r_max, r_max)
        d = ((mean.view(-1) - running_mean.to(dt)) / sigma_r).clamp(-d_max, d_max)
    w = _param(weight, dt)
    b = _param(bias, dt)
    w_eff = r if w is None else w * r
    b_eff = d if w is None else w * d
    if b is not None:
        b_eff = b_eff + b
    y = _normalize_batch_sets(x3, running_mean, running_var, w_eff, b_eff, True, factor, eps, sync, process_group)
    return y.view(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------
# parameter normalization
# --------------------------------------------------------------------------------------
def weight_standardize(weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Weight standardization (Qiao et al. 2019): per output unit over all other axes.

    ``w_hat[o] = (w[o] - mean(w[o])) / sqrt(var(w[o]) + eps)`` (biased variance); for a conv
    weight ``(O, I, kh, kw)`` the set is ``(I, kh, kw)``; for a linear weight ``(O, I)`` it is ``I``.
    """
    dims = tuple(range(1, weight.dim()))
    wc = _upcast(weight)
    var, mean = torch.var_mean(wc, dim=dims, correction=0, keepdim=True)
    return ((wc - mean) * torch.rsqrt(var + eps)).to(weight.dtype)
