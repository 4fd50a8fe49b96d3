"""One autograd node for every method whose sets are unions of *units* with pooled statistics
(bgn, gbgn, hn, sn; docs/methods.md, "Shared conventions").

A unit is a slice of the input with its own moments: a channel over the batch (``x`` itself,
statistics over every dim but 1), an ``(example, channel)`` row (the view ``(1, N*C, S)``) or a
block of one channel (``(N, K, L)``). In every case the units are dim 1 of a view ``xv`` and
their moments are over all its other dims. A method's statistics per unit are

    mu  = sum_j a_j * M_j        M_j: the unit's own mean, the mean of its set, or a constant
    var = sum_j b_j * V_j        V_j: the unit's own variance, its set's variance, or a constant

where a set is a union of equal units (an average over ``dims`` of the units reshaped to
``shape``), ``a``/``b`` are ``softmax``es of learned logits (a single part: weight 1) and the set
variance is either the law-of-total-variance pool (``tv``: ``avg v + avg (m - M)^2``) or the
clamped raw moment ``max(avg(v + m^2) - M^2, 0)`` (``raw``, the SN and "Four Things" formulas).
Output: ``y = w (x - mu) / sqrt(var + eps) + b`` (native eval-mode ``F.batch_norm`` on ``xv``).

Backward (analytic, no graph of small ops): one native reduction pass gives per unit
``sum g`` and ``sum g (x - m)``; the statistics' adjoints follow from the pooling (an average
broadcast back is its own adjoint); one elementwise pass gives ``dx = A g + B x + C`` per unit.

A *part* is a tuple: ``("own",)``, ``("const", i)`` (the ``i``-th constant, shape ``(K,)``),
``("pool", shape, dims)`` for means, ``("tv", shape, dims)`` / ``("raw", shape, dims)`` for
variances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

Part = tuple

_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _softmax(logits: Tensor | None, dtype) -> Tensor | None:
    return None if logits is None else torch.softmax(logits.to(dtype), 0)


def _softmax_grad(weights: Tensor, g_weights: list[Tensor], dtype) -> Tensor:
    """``softmax`` backward: ``d logits = s * (g - sum s g)``."""
    gs = torch.stack(g_weights)
    return (weights * (gs - (weights * gs).sum())).to(dtype)


def _expand_affine(t: Tensor | None, layout: tuple[int, int]) -> Tensor | None:
    """Per-channel ``(C,)`` -> per-unit ``(K,)`` for units laid out as ``(before, C, after)``."""
    if t is None or layout == (1, 1):
        return t
    before, after = layout
    return t.view(1, -1, 1).expand(before, -1, after).reshape(-1)


def _reduce_affine(t: Tensor, layout: tuple[int, int]) -> Tensor:
    """Per-unit ``(K,)`` gradient -> per-channel ``(C,)`` (the adjoint of :func:`_expand_affine`)."""
    if layout == (1, 1):
        return t
    before, after = layout
    return t.view(before, -1, after).sum((0, 2))


def _add(total: Tensor | None, term: Tensor, shape=None) -> Tensor:
    """``total + term`` per unit ``(K,)``; a set-level ``term`` (keepdim in ``shape``) is broadcast."""
    if shape is None:
        return term if total is None else total + term
    if total is None:
        return term.expand(shape).reshape(-1)
    return (total.view(shape) + term).view(-1)


def _statistics(m: Tensor, v: Tensor, mean_parts, var_parts, consts):
    """Per-part statistics from the units' moments ``m``, ``v`` ``(K,)``: per part the per-unit
    value ``(K,)`` and, for pooled parts, the set-level tensors kept for backward."""
    pooled: dict = {}  # (shape, dims) -> set mean: a mean part and a variance part may share it

    def set_mean(part):
        key = (part[1], part[2])
        if key not in pooled:
            pooled[key] = m.view(part[1]).mean(part[2], keepdim=True)
        return pooled[key]

    means, mean_sets = [], []
    for part in mean_parts:
        if part[0] == "own":
            means.append(m)
        elif part[0] == "const":
            means.append(consts[part[1]])
        else:
            M = set_mean(part)
            mean_sets.append(M)
            means.append(M.expand(part[1]).reshape(-1))
    variances, var_sets = [], []
    for part in var_parts:
        if part[0] == "own":
            variances.append(v)
        elif part[0] == "const":
            variances.append(consts[part[1]])
        else:
            M = set_mean(part)
            dm = m.view(part[1]) - M
            if part[0] == "tv":  # law of total variance: avg v + avg (m - M)^2
                V, mask = (v.view(part[1]) + dm * dm).mean(part[2], keepdim=True), None
            else:  # max(avg E[x^2] - M^2, 0)
                raw = (v + m * m).view(part[1]).mean(part[2], keepdim=True) - M * M
                V, mask = raw.clamp_min(0.0), raw > 0
            var_sets.append((M, V, dm, mask))
            variances.append(V.expand(part[1]).reshape(-1))
    return means, mean_sets, variances, var_sets


def _weighted_sum(parts: list[Tensor], weights: Tensor | None) -> Tensor:
    if weights is None:
        return parts[0]
    total = weights[0] * parts[0]
    for k in range(1, len(parts)):
        total = total + weights[k] * parts[k]
    return total


class _PooledSetNorm(torch.autograd.Function):
    """``(xv, weight, bias, mean_logits, var_logits, plan, eps, *consts) -> (y, m, v, *set_stats)``.

    ``plan = (affine_layout, mean_parts, var_parts)``; ``m``/``v`` are the units' own mean and
    biased variance ``(K,)``; ``set_stats`` holds the set means of the pooled mean parts, then the
    set variances of the pooled variance parts, set-level shapes. Only ``y`` is differentiable. Backward recomputes the (small) statistics from the saved ``m``, ``v``.
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, plan, eps, *consts):
        layout, mean_parts, var_parts = plan
        K = xv.shape[1]
        red = [d for d in range(xv.dim()) if d != 1]
        m_b = xv.mean(red, keepdim=True)
        # one full-size temporary, squared in place; two fast reductions (no E[x^2] - E[x]^2)
        v = (xv - m_b).square_().mean(red)
        m = m_b.view(K)
        alpha, beta = _softmax(mean_logits, m.dtype), _softmax(var_logits, m.dtype)
        means, mean_sets, variances, var_sets = _statistics(m, v, mean_parts, var_parts, consts)
        mu, var = _weighted_sum(means, alpha), _weighted_sum(variances, beta)
        y = torch.batch_norm(xv, _expand_affine(weight, layout), _expand_affine(bias, layout), mu, var, False, 0.0, eps, False)
        ctx.save_for_backward(xv, weight, m, v, mu, var, mean_logits, var_logits, *consts)
        ctx.plan, ctx.eps = plan, eps
        stats = mean_sets + [V for _, V, _, _ in var_sets]
        ctx.mark_non_differentiable(m, v, *stats)
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics outputs
        return (y, m, v, *stats)

    @staticmethod
    @once_differentiable  # a second derivative would need its own formula: raise, don't be wrong
    def backward(ctx, g, *_):
        if g is None:  # the output took no part in the loss
            return (None,) * len(ctx.needs_input_grad)
        xv, weight, m, v, mu, var, mean_logits, var_logits, *consts = ctx.saved_tensors
        layout, mean_parts, var_parts = ctx.plan
        alpha, beta = _softmax(mean_logits, m.dtype), _softmax(var_logits, m.dtype)
        means, _, variances, var_sets = _statistics(m, v, mean_parts, var_parts, consts)
        K = xv.shape[1]
        # per unit: sum g (x - m) and sum g, one fused native pass
        _, s_gc, s_g = _BN_BACKWARD(g, xv, None, m, torch.ones_like(m), None, None, False, 0.0, [False, True, True])
        r = torch.rsqrt(var + ctx.eps)
        t = s_gc + (m - mu) * s_g  # sum g (x - mu)
        gw = _reduce_affine(r * t, layout) if ctx.needs_input_grad[1] else None
        gb = _reduce_affine(s_g, layout) if ctx.needs_input_grad[2] else None
        a = r if weight is None else r * _expand_affine(weight, layout)
        g_mu = -a * s_g
        g_var = (-0.5 * t) * a * r * r
        g_m = g_v = None
        g_alpha, g_beta = [], []
        for j, part in enumerate(mean_parts):
            if alpha is not None:
                g_alpha.append((g_mu * means[j]).sum())
            gj = g_mu if alpha is None else alpha[j] * g_mu
            if part[0] == "own":
                g_m = _add(g_m, gj)
            elif part[0] == "pool":
                g_m = _add(g_m, gj.view(part[1]).mean(part[2], keepdim=True), part[1])
        pooled = iter(var_sets)
        for j, part in enumerate(var_parts):
            if beta is not None:
                g_beta.append((g_var * variances[j]).sum())
            gj = g_var if beta is None else beta[j] * g_var
            if part[0] == "own":
                g_v = _add(g_v, gj)
            elif part[0] != "const":
                _, _, dm, mask = next(pooled)
                P = gj.view(part[1]).mean(part[2], keepdim=True)
                if mask is not None:
                    P = P * mask
                g_v = _add(g_v, P, part[1])
                g_m = _add(g_m, (2.0 * dm * P).view(-1))
        gx = None
        if ctx.needs_input_grad[0]:
            n = xv.numel() // K
            shape = [1, K] + [1] * (xv.dim() - 2)
            gx = g * a.view(shape)
            if g_v is not None:
                coef_x = g_v * (2.0 / n)
                gx.addcmul_(xv, coef_x.view(shape))
                g_m = _add(g_m, -n * coef_x * m)
            if g_m is not None:
                gx.add_((g_m / n).view(shape))
        g_mean_logits = _softmax_grad(alpha, g_alpha, mean_logits.dtype) if alpha is not None and ctx.needs_input_grad[3] else None
        g_var_logits = _softmax_grad(beta, g_beta, var_logits.dtype) if beta is not None and ctx.needs_input_grad[4] else None
        return (gx, gw, gb, g_mean_logits, g_var_logits, None, None) + (None,) * (len(ctx.needs_input_grad) - 7)


def pooled_set_norm(
    xv: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    affine_layout: tuple[int, int],
    mean_parts: tuple[Part, ...],
    var_parts: tuple[Part, ...],
    eps: float,
    consts: tuple[Tensor, ...] = (),
    mean_logits: Tensor | None = None,
    var_logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """Normalize the units (dim 1) of ``xv`` with pooled statistics (see the module docstring).

    Args:
        xv: the input viewed so that its units are dim 1, in the compute dtype.
        weight, bias: per-channel affine ``(C,)`` or ``None``; ``affine_layout = (before, after)``
            says how units map to channels: unit ``k`` of ``(before, C, after)`` has channel ``c``.
        mean_parts, var_parts: the parts of ``mu`` and ``var``; several parts are mixed with
            ``softmax(mean_logits)`` / ``softmax(var_logits)``.
        consts: the ``(K,)`` constants that ``("const", i)`` parts name (e.g. running statistics).

    Returns:
        ``(y, m, v, set_stats)``: the output (``xv``'s shape), the units' own mean and biased
        variance ``(K,)`` and the set statistics of the pooled parts (see ``_PooledSetNorm``).
    """
    y, m, v, *stats = _PooledSetNorm.apply(
        xv, weight, bias, mean_logits, var_logits, (affine_layout, tuple(mean_parts), tuple(var_parts)), eps, *consts
    )
    return y, m, v, tuple(stats)


def channel_group_part(kind: str, C: int, groups: int) -> Part:
    """A part over channel units ``(C,)`` whose sets are ``groups`` groups of contiguous channels."""
    return ("own",) if groups == C else (kind, (groups, C // groups), (1,))


def row_part(kind: str, N: int, C: int, groups: int, batch: bool) -> Part:
    """A part over ``(example, channel)`` row units ``(N*C,)``: sets of ``C/groups`` contiguous
    channels, within one example or (``batch``) over the batch."""
    if groups == C and not batch:
        return ("own",)
    return (kind, (N, groups, C // groups), (0, 2) if batch else (2,))
