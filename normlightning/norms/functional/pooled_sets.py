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
variance is the law-of-total-variance pool ``avg v + avg (m - M)^2`` (``tv``). The raw-moment
formula ``max(avg(v + m^2) - M^2, 0)`` of SN and "Four Things" is the same number in exact
arithmetic (never negative, so the clamp never acts), without its float32 cancellation on data
whose mean is large against its spread (docs/methods.md, "Precision").
Output: ``y = w (x - mu) / sqrt(var + eps) + b`` (native eval-mode ``F.batch_norm`` on ``xv``).

Backward (analytic, no graph of small ops): one native reduction pass gives per unit
``sum g`` and ``sum g (x - m)``; the statistics' adjoints follow from the pooling (an average
broadcast back is its own adjoint); then ``dx = A g + B (x - m) + C`` per unit, in elementwise
passes that write one output tensor (``x - m``, ``*= B``, ``+= C``, ``+= A g``). The
centred term keeps float32 gradients exact where ``x`` is near its unit's mean (a unit of one
value, data offset by many standard deviations), where ``B x - B m`` would cancel; likewise a
pooled variance's adjoint keeps its path through the set mean, ``dV/dm_k = 2/n (dm_k - avg dm)``,
whose last term is 0 in exact arithmetic and the rounding of ``M`` in float32 (docs/methods.md,
"Precision"). The upstream gradient is first laid out like ``xv`` (:func:`~.layout.laid_out_as`:
the native reduction misreads another layout).

A *part* is a tuple: ``("own",)``, ``("const", i)`` (the ``i``-th constant, shape ``(K,)``),
``("pool", shape, dims)`` for means, ``("tv", shape, dims)`` for variances.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .layout import laid_out_as
from .moments import channel_moments

Part = tuple

_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _softmax_grad(weights: Tensor, g_weights: Tensor, dtype) -> Tensor:
    """``softmax`` backward: ``d logits = s * (g - sum s g)``."""
    return (weights * (g_weights - (weights * g_weights).sum())).to(dtype)


def _spread(t: Tensor, shape) -> Tensor:
    """``t`` broadcast to ``shape`` and flattened, as a real contiguous tensor: a stride-0 view
    (a one-element ``t``) would send the native batch-norm kernels down their slow generic path."""
    return t.expand(shape).contiguous().view(-1)


def _expand_affine(t: Tensor | None, layout: tuple[int, int]) -> Tensor | None:
    """Per-channel ``(C,)`` -> per-unit ``(K,)`` for units laid out as ``(before, C, after)``."""
    if t is None or layout == (1, 1):
        return t
    before, after = layout
    return _spread(t.view(1, -1, 1), (before, t.shape[0], after))


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
        return _spread(term, shape)
    return (total.view(shape) + term).view(-1)


def _mixed(parts: list[Tensor], weights: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``sum_j w_j parts_j`` and the stacked parts ``(J, K)`` (kept for the weights' gradient);
    a single part is returned as is."""
    if weights is None:
        return parts[0], None
    stacked = torch.stack(parts)
    return (weights.unsqueeze(1) * stacked).sum(0), stacked


def _stage_forward(m: Tensor, v: Tensor, mean_parts, var_parts, consts, alpha, beta, eps, saved: list, reported: list):
    """One stage's statistics from its units' moments ``m``, ``v`` ``(K,)``: returns ``(mu, var, r)``
    per unit with ``r = 1 / sqrt(var + eps)``; appends the set statistics reported to the caller to
    ``reported`` and what the backward needs to ``saved`` (per pooled variance part ``m - M``,
    then the stacked parts of the mixtures)."""
    pooled: dict = {}  # (shape, dims) -> set mean: a mean part and a variance part may share it
    means = []
    for part in mean_parts:
        kind = part[0]
        if kind == "own":
            means.append(m)
        elif kind == "const":
            means.append(consts[part[1]])
        else:
            M = pooled[part[1:]] = m.view(part[1]).mean(part[2], keepdim=True)
            reported.append(M)
            means.append(_spread(M, part[1]))
    variances = []
    for part in var_parts:
        kind = part[0]
        if kind == "own":
            variances.append(v)
        elif kind == "const":
            variances.append(consts[part[1]])
        else:
            shape, dims = part[1], part[2]
            M = pooled.get(part[1:])
            if M is None:
                M = pooled[part[1:]] = m.view(shape).mean(dims, keepdim=True)
            dm = m.view(shape) - M
            V = (v.view(shape) + dm * dm).mean(dims, keepdim=True)  # law of total variance
            reported.append(V)
            saved.append(dm)
            variances.append(_spread(V, shape))
    mu, mean_stack = _mixed(means, alpha)
    var, var_stack = _mixed(variances, beta)
    saved += (mean_stack, var_stack)
    return mu, var, torch.rsqrt(var + eps)


def _stage_backward(g_mu, g_var, mean_parts, var_parts, alpha, beta, saved: list):
    """Adjoints of one stage's statistics: ``(g_m, g_v)`` of its units' moments (``None`` when
    nothing depends on them) and the gradients of the mixture weights (``None`` without);
    takes the stage's tensors from the end of ``saved``."""
    var_stack, mean_stack = saved.pop(), saved.pop()
    g_m = g_v = None
    g_means = None if alpha is None else alpha.unsqueeze(1) * g_mu  # (J, K): part j's share
    g_vars = None if beta is None else beta.unsqueeze(1) * g_var
    for j, part in enumerate(mean_parts):
        gj = g_mu if alpha is None else g_means[j]
        if part[0] == "own":
            g_m = _add(g_m, gj)
        elif part[0] == "pool":
            g_m = _add(g_m, gj.view(part[1]).mean(part[2], keepdim=True), part[1])
    pooled = [saved.pop() for part in var_parts if part[0] == "tv"][::-1]
    k = 0
    for j, part in enumerate(var_parts):
        gj = g_var if beta is None else g_vars[j]
        if part[0] == "own":
            g_v = _add(g_v, gj)
        elif part[0] != "const":
            dm = pooled[k]
            k += 1
            P = gj.view(part[1]).mean(part[2], keepdim=True)
            g_v = _add(g_v, P, part[1])
            # dV/dm_k = 2/n (dm_k - avg dm), the second term through M = avg m: 0 in exact arithmetic,
            # in float32 avg dm is M's rounding, which 2 P dm alone would carry to every unit of the set
            centred = dm - dm.mean(part[2], keepdim=True)
            if g_m is None:
                g_m = (centred * (2.0 * P)).view(-1)
            else:
                g_m = torch.addcmul(g_m.view(part[1]), centred, P, value=2.0).view(-1)
    g_alpha = None if alpha is None else (mean_stack * g_mu).sum(1)
    g_beta = None if beta is None else (var_stack * g_var).sum(1)
    return g_m, g_v, g_alpha, g_beta


def _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan, eps, consts):
    """The forward of :class:`_PooledSetNorm` as a plain function: ``(y, m, v, reported, kept)``
    with ``kept`` what the backward needs (``P, m_out, alpha, beta`` and each stage's tensors)."""
    layout, stages = plan
    m, v = channel_moments(xv)
    alpha = None if mean_logits is None else torch.softmax(mean_logits.to(m.dtype), 0)
    beta = None if var_logits is None else torch.softmax(var_logits.to(m.dtype), 0)
    saved: list = []
    reported: list = []
    m_s, v_s, P = m, v, None  # P: the product of the stages' r so far
    last = len(stages) - 1
    for s, (mean_parts, var_parts) in enumerate(stages):
        mu, var, r = _stage_forward(
            m_s,
            v_s,
            mean_parts,
            var_parts,
            consts,
            alpha if s == last else None,
            beta if s == last else None,
            eps,
            saved,
            reported,
        )
        saved += (m_s, P, mu, r)
        P = r if P is None else P * r
        m_s = (m_s - mu) * r
        if s != last:
            v_s = v_s * (r * r)
    w, b = _expand_affine(weight, layout), _expand_affine(bias, layout)
    if last == 0:  # y = w (x - mu) / sqrt(var + eps) + b
        y = torch.batch_norm(xv, w, b, mu, var, False, 0.0, eps, False)
    else:  # y = w ((x - m) P + m_out) + b, m_out the last stage's output mean
        scale = P if w is None else w * P
        shift = m_s if w is None else w * m_s
        y = torch.batch_norm(
            xv, scale, shift if b is None else shift + b, m, torch.ones_like(m), False, 0.0, 0.0, False
        )
    return y, m, v, reported, [P, m_s, alpha, beta, *saved]


class _PooledSetNorm(torch.autograd.Function):
    """``(xv, weight, bias, mean_logits, var_logits, plan, eps, *consts) -> (y, m, v, *set_stats)``.

    ``plan = (affine_layout, stages)``, ``stages`` a tuple of ``(mean_parts, var_parts)`` applied
    one after the other (each normalizes the previous one's output; the mixture weights mix the
    last stage's parts; the affine follows the last stage). ``m``/``v`` are the units' own mean
    and biased variance ``(K,)``; ``set_stats`` holds, stage by stage, the set means of the
    pooled mean parts, then the set variances of the pooled variance parts (set-level shapes).
    Only ``y`` is differentiable. The small per-unit tensors of the forward are kept for the
    backward, stage by stage in one flat ``save_for_backward`` list.
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, plan, eps, *consts):
        y, m, v, reported, kept = _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan, eps, consts)
        ctx.save_for_backward(xv, weight, m, v, mean_logits, var_logits, *kept)
        ctx.plan = plan
        ctx.mark_non_differentiable(m, v, *reported)
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics outputs
        return (y, m, v, *reported)

    @staticmethod
    @once_differentiable  # a second derivative would need its own formula: raise, don't be wrong
    def backward(ctx, g, *_):
        if g is None:  # the output took no part in the loss
            return (None,) * len(ctx.needs_input_grad)
        xv, weight, m, v, mean_logits, var_logits, P, m_out, alpha, beta, *saved = ctx.saved_tensors
        layout, stages = ctx.plan
        K = xv.shape[1]
        g = laid_out_as(g, xv.stride())
        # per unit: sum g (x - m) and sum g, one fused native pass
        _, s_gc, s_g = _BN_BACKWARD(g, xv, None, m, torch.ones_like(m), None, None, False, 0.0, [False, True, True])
        # y = w ((x - m) P + m_out) + b: the gradients of w, b and the cotangents of P, m_out
        last = len(stages) - 1
        own_mean = last == 0 and len(stages[0][0]) == 1 and stages[0][0][0][0] == "own"  # m_out = 0
        if ctx.needs_input_grad[1]:
            gw = _reduce_affine(P * s_gc if own_mean else P * s_gc + m_out * s_g, layout)
        else:
            gw = None
        gb = _reduce_affine(s_g, layout) if ctx.needs_input_grad[2] else None
        w = _expand_affine(weight, layout)
        scale = P if w is None else w * P
        g_P = s_gc if w is None else w * s_gc
        g_mo = s_g if w is None else w * s_g
        g_v = g_alpha = g_beta = None
        for s in range(last, -1, -1):
            r, mu, P_in, m_in = saved.pop(), saved.pop(), saved.pop(), saved.pop()
            g_r = g_P if P_in is None else g_P * P_in
            if not (s == 0 and own_mean):
                g_r = g_r + g_mo * (m_in - mu)
            g_mu = g_mo * -r
            # the m_in -> m_s path: for one stage it cancels with the output's explicit -m term
            g_mo = None if s == 0 and last == 0 else g_mo * r
            gm_s, gv_s, ga, gb_ = _stage_backward(
                g_mu,
                (-0.5 * g_r) * r * r * r,
                *stages[s],
                alpha if s == last else None,
                beta if s == last else None,
                saved,
            )
            if s == last:
                g_alpha, g_beta = ga, gb_
            if gm_s is not None:
                g_mo = _add(g_mo, gm_s)
            if s == 0:  # the first stage's inputs are the units' own moments
                if gv_s is not None:
                    g_v = _add(g_v, gv_s)
            else:  # a later stage's inputs: m_in (carried in g_mo) and v_in = v P_in^2
                g_P = g_P * r
                if gv_s is not None:
                    g_P = g_P + gv_s * 2.0 * v * P_in
                    g_v = _add(g_v, gv_s * P_in * P_in)
        # m_out's dependence on m through the stages is in g_mo; add the output's explicit -m term
        g_m = g_mo if last == 0 else _add(g_mo, -scale * s_g)
        gx = None
        if ctx.needs_input_grad[0]:
            n = xv.numel() // K
            shape = [1, K] + [1] * (xv.dim() - 2)
            if g_v is None:
                gx = g * scale.view(shape)
                if g_m is not None:
                    gx.add_((g_m / n).view(shape))
            else:  # B (x - m) + C + A g: centred (no cancellation of B x against B m)
                gx = xv - m.view(shape)
                gx.mul_((g_v * (2.0 / n)).view(shape))
                if g_m is not None:
                    gx.add_((g_m / n).view(shape))
                gx.addcmul_(g, scale.view(shape))
        g_mean_logits = (
            _softmax_grad(alpha, g_alpha, mean_logits.dtype)
            if g_alpha is not None and ctx.needs_input_grad[3]
            else None
        )
        g_var_logits = (
            _softmax_grad(beta, g_beta, var_logits.dtype) if g_beta is not None and ctx.needs_input_grad[4] else None
        )
        return (gx, gw, gb, g_mean_logits, g_var_logits, None, None) + (None,) * (len(ctx.needs_input_grad) - 7)


def pooled_set_norm(
    xv: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    affine_layout: tuple[int, int],
    stages: tuple[tuple[tuple[Part, ...], tuple[Part, ...]], ...],
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
        stages: ``((mean_parts, var_parts), ...)``: one normalization per stage, each of the
            previous one's output (SeqNorm has two); several parts of the last stage are mixed
            with ``softmax(mean_logits)`` / ``softmax(var_logits)``.
        consts: the ``(K,)`` constants that ``("const", i)`` parts name (e.g. running statistics).

    Returns:
        ``(y, m, v, set_stats)``: the output (``xv``'s shape), the units' own mean and biased
        variance ``(K,)`` and the set statistics of the pooled parts (see ``_PooledSetNorm``).
    """
    plan = (affine_layout, tuple((tuple(mp), tuple(vp)) for mp, vp in stages))
    inputs = (xv, weight, bias, mean_logits, var_logits)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, m, v, *stats = _PooledSetNorm.apply(*inputs, plan, eps, *consts)
        return y, m, v, tuple(stats)
    y, m, v, stats, _ = _pooled_forward(*inputs, plan, eps, consts)  # nothing to differentiate: no node
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
