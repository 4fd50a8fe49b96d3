"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020; docs/methods.md, sections
"evonorm_b0" and "evonorm_s0")."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import squared_deviations
from .layout import NormInput, spatial_size
from .moments import check_set_size, native_channel_moments, update_running_stats


def _shifted_group_norm(x4: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """EvoNorm-S0's group statistics of the grouped view ``x4 (N, G, K, S)`` (sets over ``(K, S)``): one native
    group norm of the values minus their set's first one (detached; a variance is shift-invariant: a float32
    set of equal values then has exactly 0 variance and gradient, as in exact arithmetic, docs/methods.md,
    "Precision").

    Returns ``(x_hat, rstd)``: ``x_hat = (x − mean_g) · rstd`` ``(N, G, K, S)`` and ``rstd = 1 / sqrt(var_g + eps)``
    ``(N, G, 1, 1)``. The shifted values are written contiguous (by the subtraction itself), so every memory
    format of ``x4`` runs the same kernel and gets the same statistics.
    """
    n, g, k, s = x4.shape
    shifted = torch.sub(x4, x4.detach()[:, :, :1, :1], out=x4.new_empty(x4.shape))
    x_hat, _, rstd = torch.native_group_norm(shifted.view(n, g * k, s), None, None, n, g * k, s, g, eps)
    return x_hat.view(n, g, k, s), rstd.view(n, g, 1, 1)


#: ATen's batch norm writing into given tensors (``torch.ops.aten.native_batch_norm.out``)
_BN_OUT = torch.ops.aten.native_batch_norm.out


def _training_statistics(
    x3: Tensor, running_var: Tensor | None, factor: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-B0's batch and instance statistics of a contiguous ``x3 (N, C, S)`` in training, each from one
    native batch norm: on ``x3`` (sets over ``(N, S)``) and on its view ``(1, N·C, S)`` (sets over ``S``).

    Returns ``(d1, std_i, xhat_b, xhat_i)``: ``d1 = sqrt(var_b + eps)`` ``(1, C, 1)``, ``std_i = sqrt(var_i + eps)``
    ``(N, C, 1)`` (the reciprocals, in one op, of the kernels' ``1 / sqrt(var + eps)``, which they write side by
    side) and the normalized inputs ``xhat_b = (x − mean_b) / d1``, ``xhat_i = (x − mean_i) / std_i``
    ``(N, C, S)``, the directions of the two variances' gradients (the backward of :class:`_EvoNormB0`). With
    ``factor > 0`` ``running_var`` is updated with PyTorch's rule ``(1-f) r + f · var_b · n/(n-1)``, ``n = N·S``:
    in the kernel for a buffer of ``x3``'s dtype (its running mean a scratch), any other by
    :func:`update_running_stats` from the batch moments.
    """
    n, c, s = x3.shape
    update = running_var is not None and factor != 0
    in_kernel = update and running_var.dtype == x3.dtype
    rstd = x3.new_empty(c + n * c)
    scratch_mean = x3.new_empty(c) if in_kernel else None
    tracked = running_var if in_kernel else None
    xhat_b = _BN_OUT(
        x3, None, None, scratch_mean, tracked, True, factor, eps,
        out=torch.empty_like(x3), save_mean=x3.new_empty(c), save_invstd=rstd[:c],
    )[0]  # fmt: skip
    if update and not in_kernel:
        mean_b, var_b = native_channel_moments(x3)
        update_running_stats(None, running_var, mean_b, var_b, n * s, factor)
    xhat_i = _BN_OUT(
        x3.view(1, n * c, s), None, None, None, None, True, 0.0, eps,
        out=torch.empty_like(x3).view(1, n * c, s), save_mean=x3.new_empty(n * c), save_invstd=rstd[c:],
    )[0]  # fmt: skip
    std = rstd.reciprocal()
    return std[:c].view(1, c, 1), std[c:].view(n, c, 1), xhat_b, xhat_i.view(n, c, s)


def _inference_statistics(x3: Tensor, reference: Tensor, eps: float, centred: bool) -> tuple[Tensor, Tensor, Tensor]:
    """EvoNorm-B0's statistics of ``x3 (N, C, S)`` at inference, with the running variance ``reference`` ``(C,)``.

    Returns ``(d1, std_i, xhat_i)``: ``d1 = sqrt(reference + eps)`` ``(1, C, 1)``, ``std_i = sqrt(var_i + eps)``
    ``(N, C, 1)`` and, when ``centred`` (for a backward), ``xhat_i = (x − mean_i) / std_i`` (else ``None``).
    The instance moments of a contiguous ``x3`` are one op, the native batch-norm statistics kernel on the
    view ``(1, N·C, S)``; of any other layout a mean, the squared deviations and a mean. Both centre before
    squaring.
    """
    n, c, s = x3.shape
    if x3.is_contiguous():
        mean_i, var_i = native_channel_moments(x3.view(1, n * c, s))
        mean_i, var_i = mean_i.view(n, c, 1), var_i.view(n, c, 1)
    else:
        mean_i = x3.mean(dim=2, keepdim=True)
        var_i = squared_deviations(x3, mean_i).mean(dim=2, keepdim=True)
    std_i = torch.sqrt(var_i + eps)
    xhat_i = (x3 - mean_i).div_(std_i) if centred else None
    return torch.sqrt(reference.view(1, -1, 1) + eps), std_i, xhat_i


def _evonorm_b0_terms(
    x3: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, d1: Tensor, std_i: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-B0 of ``x3 (N, C, S)`` given ``d1 = sqrt(var_b + eps)`` ``(1, C, 1)`` and ``std_i = sqrt(var_i + eps)``
    ``(N, C, 1)`` (docs/methods.md, section "evonorm_b0").

    Returns ``(y, q, d2, den)``: ``y = gamma · q + beta`` with ``q = x / den``, ``den = max(d1, d2)`` and
    ``d2 = v x + std_i``.
    """
    d2 = (x3 * v.view(1, -1, 1)).add_(std_i)
    den = torch.maximum(d1, d2)
    q = x3 / den
    y = q if weight is None else q * weight.view(1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1) if y is q else y.add_(bias.view(1, -1, 1))
    return y, q, d2, den


#: ATen's batch-norm backward (``torch.ops.aten.native_batch_norm_backward``)
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


class _EvoNormB0(torch.autograd.Function):
    """:func:`_evonorm_b0_terms` as one autograd node with a hand-written backward; in training it also
    computes the statistics and updates the running variance (:func:`_training_statistics`). It computes on
    contiguous data (a copy of another layout's ``x`` and ``dL/dy``; ``dL/dx`` gets a dense ``x``'s strides back). With
    ``g_q = dL/dy · gamma``, ``G = g_q · q / den`` (``= −dL/dden``) and the share ``m = 1, 1/2, 0`` of ``d2`` in
    ``den`` (``d2`` above, equal to, below ``d1``: ``torch.maximum``'s gradient rule), from
    ``sign = sign(d1 − d2)`` as ``m = (1 − sign) / 2``::

        dL/dd2   = −m G       = (−G + G · sign) / 2       (per element)
        dL/dd1   = −(1 − m) G = (−G − G · sign) / 2       (per element; in training)
        dL/dx    = g_q / den + v · dL/dd2 + (Σ_s dL/dd2) · xhat_i / S
                   [ + (Σ_{n,s} dL/dd1) · xhat_b / (N S)    in training ]
        dL/dv_c  = Σ_{n,s} dL/dd2 · x,   dL/dgamma_c = Σ_{n,s} dL/dy · q,   dL/dbeta_c = Σ_{n,s} dL/dy

    with ``xhat_i = (x − mean_i) / std_i`` and ``xhat_b = (x − mean_b) / d1`` (``d std_i / dx = xhat_i / S``,
    ``d d1 / dx = xhat_b / (N S)``). The sums are native eval-mode batch-norm backwards with mean 0 and
    variance 0, exactly ``Σ grad · t / sqrt(eps)`` and ``Σ grad`` per channel: ``dL/dgamma``, ``dL/dbeta`` and
    ``g_q`` (its input gradient) from one on ``dL/dy`` and ``q``; ``Σ_s dL/dd2 · x`` and ``Σ_s dL/dd2`` from one
    on the view ``(1, N·C, S)`` (``eps = 4``: the factor 1/2); ``Σ_{n,s} −G · sign`` and ``Σ_{n,s} −G`` from one on
    ``(N, C, S)``. ``−G ± G · sign`` are exact (``sign`` is −1, 0 or 1). A second derivative raises (the backward
    is not differentiated).
    """

    @staticmethod
    def forward(ctx, x3, v, weight, bias, reference, running_var, factor, eps):
        # dL/dx gets the strides an elementwise op would give it: x's if dense, else contiguous
        ctx.grad_stride = None if x3.is_contiguous() else torch.empty_like(x3).stride()
        x3 = x3.contiguous()
        if reference is None:
            d1, std_i, xhat_b, xhat_i = _training_statistics(x3, running_var, factor, eps)
        else:
            (d1, std_i, xhat_i), xhat_b = _inference_statistics(x3, reference, eps, centred=True), None
        y, q, d2, den = _evonorm_b0_terms(x3, v, weight, bias, d1, std_i)
        ctx.save_for_backward(x3, v, weight, q, d1, d2, den, xhat_b, xhat_i)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x3, v, weight, q, d1, d2, den, xhat_b, xhat_i = ctx.saved_tensors
        n, c, s = x3.shape
        grad_y = grad_y.contiguous()
        zeros = d2.new_zeros(n * c)  # mean and variance 0 of the summing batch-norm backwards
        sums_only = [False, True, True]
        grad_q, grad_weight, grad_bias = None, None, None
        if weight is not None or ctx.has_bias:
            mask = [weight is not None, weight is not None, ctx.has_bias]
            grad_q, grad_weight, grad_bias = _BN_BACKWARD(
                grad_y, q, weight, zeros[:c], zeros[:c], None, None, False, 1.0, mask
            )
        grad_q_den = torch.div(grad_y, den) if grad_q is None else grad_q.div_(den)
        g_neg = torch.addcmul(zeros[:1].view(1, 1, 1), grad_q_den, q, value=-1.0)  # −G = dL/dden
        sign = torch.sub(d1, d2).sign_()
        g_d2 = torch.addcmul(g_neg, g_neg, sign, value=-1.0)  # 2 dL/dd2
        grad_xv, grad_std_i = _BN_BACKWARD(
            g_d2.view(1, n * c, s), x3.view(1, n * c, s), None, zeros, zeros, None, None, False, 4.0, sums_only
        )[1:]  # Σ_s dL/dd2 · x, 2 Σ_s dL/dd2
        grad_v = grad_xv.view(n, c).sum(dim=0)
        grad_x = torch.addcmul(grad_q_den, g_d2, v.view(1, -1, 1), value=0.5)
        grad_x.addcmul_(xhat_i, grad_std_i.view(n, c, 1), value=0.5 / s)
        if xhat_b is not None:
            sign_sum, g_sum = _BN_BACKWARD(g_neg, sign, None, zeros[:c], zeros[:c], None, None, False, 1, sums_only)[1:]
            grad_x.addcmul_(xhat_b, torch.add(g_sum, sign_sum).view(1, c, 1), value=0.5 / (n * s))  # 2 dL/dd1
        if ctx.grad_stride is not None and grad_x.stride() != ctx.grad_stride:
            grad_x = grad_x.new_empty_strided(grad_x.shape, ctx.grad_stride).copy_(grad_x)
        return grad_x, grad_v, grad_weight, grad_bias, None, None, None, None


def evonorm_b0(
    x: Tensor,
    v: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    factor: float,
    eps: float,
) -> Tensor:
    """EvoNorm-B0 of ``x (N, C, *spatial)`` with at least one spatial dim::

        var_b[c]   = biased variance of x[:, c, :] over (N, S)   (training; running_var at inference)
        var_i[n,c] = biased variance of x[n, c, :] over S
        y = gamma_c · x / max(sqrt(var_b + eps), v_c · x + sqrt(var_i + eps)) + beta_c

    In training the gradient flows through ``var_b`` and, when ``factor > 0``, ``running_var`` is
    updated in place with PyTorch's rule (``(1-f) r + f · var_b · n/(n-1)``, ``n = N·S``). With
    gradients, one autograd node (:class:`_EvoNormB0`).

    Args:
        v: ``(C,)``, the learned per-channel slope of the instance term.
        running_var: ``(C,)`` (required at inference), or ``None`` in training without tracking.
        weight, bias: ``(C,)`` or ``None``.
    """
    if training:
        fix = "use more than one position per channel map, or another method"
        check_set_size(spatial_size(x), "EvoNormB0's instance variance", fix)
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    v = v if v.dtype == inp.dtype else v.to(inp.dtype)
    reference = None if training else running_var if running_var.dtype == inp.dtype else running_var.to(inp.dtype)
    if torch.is_grad_enabled():
        tracked = running_var if training else None  # (dynamo: no tensor twice among the inputs)
        y = _EvoNormB0.apply(x3, v, inp.weight, inp.bias, reference, tracked, factor, eps)
    else:
        if training:
            x3 = x3.contiguous()
            d1, std_i = _training_statistics(x3, running_var, factor, eps)[:2]
        else:
            d1, std_i = _inference_statistics(x3, reference, eps, centred=False)[:2]
        y = _evonorm_b0_terms(x3, v, inp.weight, inp.bias, d1, std_i)[0]
    return inp.output(y)


def _evonorm_s0_terms(
    x4: Tensor, v: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """EvoNorm-S0 on the grouped view ``x4 (N, G, C/G, S)`` (docs/methods.md, section "evonorm_s0").

    Returns ``(y, x_hat, rstd, gate, h, scale)``: the output ``y = scale · h + beta`` with ``h = x · sigmoid(v x)``
    and ``scale = gamma · rstd`` (``rstd`` itself without the affine, ``scale`` then ``None``);
    ``x_hat = (x − mean_g) · rstd`` and ``rstd = 1 / sqrt(var_g + eps)`` ``(N, G, 1, 1)`` from
    :func:`_shifted_group_norm`; ``gate = sigmoid(v x)``.
    """
    n, g, k, _ = x4.shape
    x_hat, rstd = _shifted_group_norm(x4, eps)
    gate = torch.sigmoid(x4 * v.view(1, g, k, 1))
    h = x4 * gate
    scale = None if weight is None else rstd * weight.view(1, g, k, 1)  # (N, G, C/G, 1)
    y = h * (rstd if scale is None else scale)
    if bias is not None:
        y = y.add_(bias.view(1, g, k, 1))
    return y, x_hat, rstd, gate, h, scale


class _EvoNormS0(torch.autograd.Function):
    """:func:`_evonorm_s0_terms` as one autograd node with a hand-written backward. With ``L = C/G · S``
    the size of a set, ``g_h = dL/dy · scale`` and ``T = g_h · x · sigma'(v x)``::

        A[n,c]      = Σ_s dL/dy · h
        dL/dgamma_c = Σ_n A · rstd,   dL/dbeta_c = Σ_{n,s} dL/dy,   dL/dv_c = Σ_{n,s} T · x
        k[n,g]      = rstd² · Σ_{c in g} gamma_c A          (−dL/dvar_g · 2 / rstd)
        dL/dx       = g_h · sigmoid(v x) + v · T − k · x_hat / L        (x_hat = (x − mean_g) · rstd)

    A second derivative raises (the backward is not differentiated).
    """

    @staticmethod
    def forward(ctx, x4, v, weight, bias, eps):
        y, x_hat, rstd, gate, h, scale = _evonorm_s0_terms(x4, v, weight, bias, eps)
        ctx.save_for_backward(x4, v, weight, x_hat, rstd, gate, h, scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x4, v, weight, x_hat, rstd, gate, h, scale = ctx.saved_tensors
        n, g, k, s = x4.shape
        a = (grad_y * h).sum(dim=3, keepdim=True)  # (N, G, C/G, 1)
        grad_weight = (a * rstd).sum(dim=0).view(-1) if weight is not None else None
        grad_bias = grad_y.sum(dim=(0, 3)).view(-1) if ctx.has_bias else None
        a_scale = a * (rstd if scale is None else scale)  # gamma A rstd
        k_var = a_scale.sum(dim=2, keepdim=True).mul_(rstd)  # (N, G, 1, 1)
        grad_h = grad_y * (rstd if scale is None else scale)
        t = torch.ops.aten.sigmoid_backward(grad_h * x4, gate)
        grad_v = (t * x4).sum(dim=(0, 3)).view(-1)
        grad_x = torch.addcmul(grad_h.mul_(gate), t, v.view(1, g, k, 1))
        grad_x.addcmul_(x_hat, k_var, value=-1.0 / (k * s))
        return grad_x, grad_v, grad_weight, grad_bias, None


def evonorm_s0(
    x: Tensor,
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    num_groups: int,
    eps: float,
    training: bool = False,
) -> Tensor:
    """EvoNorm-S0 of ``x (N, C, *spatial)``, ``num_groups`` = ``G`` dividing ``C``::

        var_g[n,g] = biased variance of x[n, c in g, :] over (C/G, S)   (GN's sets)
        y = gamma_c · x · sigmoid(v_c · x) / sqrt(var_g + eps) + beta_c

    The same computation in training and at inference (no running statistics); ``training`` only
    turns on the check that a set holds more than one value. With gradients, one autograd node
    (:class:`_EvoNormS0`).
    """
    if training:
        size = (x.shape[1] // num_groups) * spatial_size(x)
        check_set_size(size, "EvoNormS0", "use fewer groups (num_groups) or inputs with more positions")
    inp = NormInput(x, weight, bias)
    x3 = inp.x3
    n, c, s = x3.shape
    x4 = x3.view(n, num_groups, c // num_groups, s)
    v = v if v.dtype == inp.dtype else v.to(inp.dtype)
    if torch.is_grad_enabled():
        y = _EvoNormS0.apply(x4, v, inp.weight, inp.bias, eps)
    else:
        y = _evonorm_s0_terms(x4, v, inp.weight, inp.bias, eps)[0]
    return inp.output(y.view(n, c, s))
