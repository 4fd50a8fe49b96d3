"""Statistics of normalization sets: mean and biased variance of a set, pooling of equal sets,
the optional all-reduce across processes, and PyTorch's running-statistics update.

Synchronized statistics (``sync=True``): sums and counts are all-reduced across ``process_group``
with the differentiable ``torch.distributed.nn.functional.all_reduce``, twice per variance (the mean,
then the centred squares: :func:`synced_mean_var`, :func:`pooled_moments`); without an initialized
process group the same path runs locally (a world of one).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .fused_ops import RowMoments, squared_deviations


def chunk_sizes(n: int, k: int) -> list[int]:
    """Sizes of ``k`` nearly equal chunks of ``n`` items (first ``n % k`` are one larger)."""
    base, extra = divmod(n, k)
    return [base + 1] * extra + [base] * (k - extra)


def check_set_size(size: int, what: str, fix: str) -> None:
    """Raise ``ValueError`` (naming ``what`` and the ``fix``) for a set of fewer than 2 elements."""
    if size < 2:
        raise ValueError(
            f"{what} has {size} element(s) per normalization set; a set needs more "
            f"than 1 value (its variance is undefined). {fix}"
        )


def needs_shift(dtype: torch.dtype) -> bool:
    """Whether a native normalization kernel gets its input shifted per set (by a detached value of the
    set, which cancels in ``x - mu``): below float64. On CPU (torch 2.14.1) the float32 GN / LN kernel's
    output is off by up to 1e-3 of its size on sets of 2 to 36 values at mean/std = 100, and the batch-norm
    kernel's by 1e-4 on a set of 9 equal values, its mean's rounding over ``sqrt(eps)``
    (docs/methods.md, "Precision")."""
    return dtype != torch.float64


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


def row_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over its last dim (keepdim), shapes ``(*, 1)``.

    Two passes of fast native reductions: the mean, then the centred sum of squares, so there
    is no ``E[x^2] - E[x]^2`` cancellation.
    (On CPU ``torch.var_mean`` is a slow Welford kernel, several times a whole BatchNorm.)
    The backward is one fused pass (see ``RowMoments``).
    """
    return RowMoments.apply(x)


def channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of each channel (dim 1) over every other dim, shapes ``(C,)``.

    Two fast reductions and one full-size temporary, the centred values written squared by one kernel
    (:func:`~.fused_ops.squared_deviations`): no ``E[x^2] - E[x]^2`` cancellation. Records no autograd
    node of its own (for use under ``no_grad`` or inside a custom autograd Function).
    """
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dims, keepdim=True)
    return mean.view(-1), squared_deviations(x, mean).mean(dims)


def native_channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of each channel (dim 1) of ``x (N, C, *)`` over every other dim, shapes
    ``(C,)``, in one op: the statistics kernel of the native training-mode batch norm
    (``torch.batch_norm_update_stats`` without running buffers), the very ``mu_B``, ``var_B`` that
    :func:`~.native.native_batch_norm` normalizes with (it centres before squaring: no ``E[x^2] - E[x]^2``
    cancellation). Without gradient (for use under ``no_grad``)."""
    return torch.batch_norm_update_stats(x, None, None, 0.0)


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


def synced_mean_var(x: Tensor, dims: Sequence[int], *, process_group=None) -> tuple[Tensor, Tensor, Tensor | int]:
    """Mean and biased variance of ``x`` over ``dims`` (keepdim) across the processes of
    ``process_group``, and the set size, in two passes of :func:`reduce_mean` (two all-reduces):
    the mean, then the mean of the centred squares (no ``E[x^2] - E[x]^2`` cancellation). The
    synchronized training path of the batch-set methods; local training uses native kernels or the
    pooled-set node."""
    (mean,), count = reduce_mean([x], dims, sync=True, process_group=process_group)
    (var,), _ = reduce_mean([(x - mean).square()], dims, sync=True, process_group=process_group)
    return mean, var, count


def pooled_moments(
    mean: Tensor, var: Tensor, dims: Sequence[int], *, sync: bool, process_group=None
) -> tuple[Tensor, Tensor, Tensor | int]:
    """:func:`combine_moments` of equal-size sets, across the processes of ``process_group`` with
    ``sync`` (two all-reduces: ``M = avg m``, then ``avg (v + (m - M)^2)``); also the number of
    sets pooled. No cancellation, unlike ``avg (v + m^2) - M^2``."""
    (mu,), count = reduce_mean([mean], dims, sync=sync, process_group=process_group)
    (pooled,), _ = reduce_mean([var + (mean - mu).square()], dims, sync=sync, process_group=process_group)
    return mu, pooled, count


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
    buffers' shape; ``count`` is the set size ``n``. Both buffers in one op (:func:`lerp_running`).
    """
    buffers, values = [], []
    if running_mean is not None:
        buffers.append(running_mean)
        values.append(mean)
    if running_var is not None:
        buffers.append(running_var)
        values.append(var * (count / (count - 1)))
    lerp_running(buffers, values, factor)


def lerp_running(buffers: Sequence[Tensor], batch_values: Sequence[Tensor], factor: float) -> None:
    """``r <- (1-f) r + f b`` for each running buffer ``r`` and its batch value ``b`` (already unbiased
    where it is a variance; shape broadcastable to the buffer's): one op for all buffers
    (``_foreach_lerp_``, one kernel on GPU), the update of :func:`update_running_stats`."""
    if buffers:
        torch._foreach_lerp_(list(buffers), [_like(b, r) for b, r in zip(batch_values, buffers)], factor)


def _like(t: Tensor, buffer: Tensor) -> Tensor:
    """``t`` in ``buffer``'s shape and dtype (no op for what already matches)."""
    if t.shape != buffer.shape:
        t = t.reshape(buffer.shape)
    return t if t.dtype == buffer.dtype else t.to(buffer.dtype)
