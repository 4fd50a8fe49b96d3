"""Moving Average Batch Normalization (Yan et al., ICLR 2020; docs/methods.md, section "mabn") and
the weight centering of the convolution before it."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .layout import NormInput, laid_out_as, upcast
from .native import native_batch_norm


def weight_center(weight: Tensor) -> Tensor:
    """``w[o] - mean(w[o])`` per output unit ``o`` over all other axes (``(I, *kernel)`` of a conv
    weight ``(O, I, *kernel)``, ``I`` of a linear one): MABN's weight centralization."""
    wc = upcast(weight)
    return (wc - wc.mean(dim=tuple(range(1, weight.dim())), keepdim=True)).to(weight.dtype)


def _window_mean(ring: Tensor, current: Tensor, use_current: bool) -> Tensor:
    """``current`` during warm-up, else the mean of the ring buffer (which holds ``current``)."""
    return current if use_current else ring.mean(dim=0).to(current.dtype)


def _into_slot(ring: Tensor, slot: int, dtype: torch.dtype, compute) -> Tensor:
    """The ``(C,)`` result of ``compute(out)`` (a reduction taking ``out=``, of dtype ``dtype``), stored
    in row ``slot`` of the ring buffer ``ring``: written there by the kernel itself when the dtypes
    agree (no copy), else computed and copied in (cast to ``ring``'s dtype). Returns it in ``dtype``."""
    if ring.dtype == dtype:
        return compute(ring[slot])
    value = compute(None)
    ring[slot] = value
    return value


#: ATen's batch-norm backward (``torch.ops.aten.native_batch_norm_backward``)
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


class _MovingAverageBatchNorm(torch.autograd.Function):
    """Training step of MABN on ``x (N, C, *)`` (compute dtype); see :func:`moving_average_batch_norm`.

    Forward: ``x2_t`` reduced straight into its ring slot; ``r`` computed only once it is in use; ``y`` is
    one native eval-mode batch norm with mean 0 and variance ``var + eps`` (``eps = 0`` in the kernel),
    weight ``gamma r``, bias ``beta``. It saves ``x`` (not ``z``) and ``var + eps``.
    Backward: one native eval-mode batch-norm backward gives ``g / sqrt(var + eps)`` (``g = dL/dy · gamma r``),
    ``Q = Σ_{n,s} dL/dy · z`` and ``dL/dbeta``; ``dL/dgamma = r · Q``, ``gz_t = gamma r · Q / (N·S)`` (divided
    straight into its slot) and ``dL/dx = g / sqrt(var + eps) − x · mean_gz / (var + eps)`` (``z · mean_gz /
    sqrt(var + eps)``) one in-place ``addcmul``. ``r = sqrt((var + eps) / (running_x2 + eps))``, one root.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_x2, moving_x2, moving_gz, slot, use_current, r_bounds, factor, eps):
        dims = (0,) + tuple(range(2, x.dim()))
        x2 = _into_slot(moving_x2, slot, x.dtype, lambda out: torch.mean(x.square(), dim=dims, out=out))
        var = _window_mean(moving_x2, x2, use_current)
        var_eps = var + eps
        r = None
        if r_bounds is not None:  # sqrt(var + eps) / sqrt(running_x2 + eps)
            r = torch.div(var_eps, running_x2.to(x.dtype) + eps).sqrt_().clamp_(1.0 / r_bounds, r_bounds)
        if factor:
            running_x2.lerp_(var.to(running_x2.dtype), factor)
        scale = weight if r is None else r if weight is None else weight * r  # gamma · r, or None
        zeros = torch.zeros_like(var_eps)
        y = torch.native_batch_norm(x, scale, bias, zeros, var_eps, False, 0.0, 0.0)[0]
        ctx.save_for_backward(x, var_eps, zeros, scale, r)
        ctx.moving_gz, ctx.slot, ctx.use_current = moving_gz, slot, use_current
        ctx.affine = weight is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, var_eps, zeros, scale, r = ctx.saved_tensors
        grad_y = laid_out_as(grad_y, x.stride())  # (the native backward's layout bug, see native.py)
        mask = [ctx.needs_input_grad[0], True, ctx.affine]
        g_norm, q, grad_bias = _BN_BACKWARD(grad_y, x, scale, zeros, var_eps, None, None, False, 0.0, mask)
        count = x.numel() // x.shape[1]
        gz_sum = q if scale is None else q * scale
        gz = _into_slot(ctx.moving_gz, ctx.slot, q.dtype, lambda out: torch.div(gz_sum, count, out=out))
        grad_x = None
        if g_norm is not None:
            mean_gz = _window_mean(ctx.moving_gz, gz, ctx.use_current)
            bc = (1, -1) + (1,) * (x.dim() - 2)
            grad_x = g_norm.addcmul_(x, (mean_gz / var_eps).view(bc), value=-1)
        grad_weight = (q if r is None else q * r) if ctx.affine else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def moving_average_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_x2: Tensor,
    moving_x2: Tensor,
    moving_gz: Tensor,
    *,
    training: bool,
    step: int,
    warmup_iters: int,
    renorm_start_step: int,
    r_max: float,
    factor: float,
    eps: float,
) -> Tensor:
    """MABN of ``x (N, C, *spatial)`` (no mean is subtracted; the convolution before it is centred).

    Training step ``t = step`` (1 for the first), window ``m = moving_x2.shape[0]``::

        x2_t[c]  = 1/(N·S) · Σ_{n,s} x[n,c,s]²           (stored in slot (t−1) mod m of moving_x2)
        var[c]   = x2_t while t ≤ m or t < warmup_iters, else the mean of the m stored x2
        r[c]     = clip(sqrt(var + eps) / sqrt(running_x2 + eps), 1/r_max, r_max)
                   (r = 1 while t ≤ max(renorm_start_step, warmup_iters)); running_x2 before its update
        z        = x / sqrt(var + eps);   y = gamma · r · z + beta
        running_x2 ← (1 − f) · running_x2 + f · var

    Backward, with ``g = dL/dy · gamma · r``::

        gz_t[c]  = 1/(N·S) · Σ g · z                       (stored in slot (t−1) mod m of moving_gz)
        mean_gz  = gz_t during the same warm-up, else the mean of the m stored gz
        dL/dx    = (g − z · mean_gz) / sqrt(var + eps)

    (during warm-up, the exact gradient of ``y`` with ``var = x2_t``). ``r`` is a constant.
    Inference: ``y = gamma · x / sqrt(running_x2 + eps) + beta``, one native eval-mode batch norm with mean 0
    and variance ``running_x2``.
    """
    inp = NormInput(x, weight, bias)
    if not training:
        second_moment = running_x2 if running_x2.dtype == inp.dtype else running_x2.to(inp.dtype)
        zeros = torch.zeros_like(second_moment)
        y = native_batch_norm(inp.x, zeros, second_moment, inp.weight, inp.bias, False, 0.0, eps)
        return inp.output(y)
    window = moving_x2.shape[0]
    use_current = step <= window or step < warmup_iters
    r_bounds = None if step <= max(renorm_start_step, warmup_iters) else float(r_max)
    y = _training_step(
        inp.x,
        inp.weight,
        inp.bias,
        running_x2,
        moving_x2,
        moving_gz,
        (step - 1) % window,
        use_current,
        r_bounds,
        factor,
        eps,
    )
    return inp.output(y)


@torch.compiler.disable
def _training_step(*args):
    """The training step, run eagerly under ``torch.compile`` (a graph break): its backward writes
    the ``moving_gz`` buffer, which a compiled backward graph would not."""
    return _MovingAverageBatchNorm.apply(*args)
