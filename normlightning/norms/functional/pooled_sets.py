"""One autograd node for every method whose sets are unions of *units* with pooled statistics
(hn, sn, seqnorm; docs/methods.md, "Shared conventions").

A unit is a slice of the input with its own moments: a channel over the batch (``x`` itself,
statistics over every dim but 1), an ``(example, channel)`` row (the view ``(1, N*C, S)``) or a
block of one channel (``(N, K, L)``). In every case the units are dim 1 of a view ``xv`` and
their moments ``m`` (mean), ``v`` (biased variance), ``(K,)``, are over all its other dims. A
method's statistics per unit are

    mu  = sum_j wm_j * M_j       M_j: the unit's own mean, the mean of its set, or a constant
    var = sum_j wv_j * V_j       V_j: the unit's own variance, its set's variance, or a constant

where a set is a union of equal units (an average over ``dims`` of the units reshaped to
``shape``), ``wm``/``wv`` (``mean_weights``/``var_weights``) are ``softmax``es of learned logits (a
single part: weight 1) and the set variance is the law-of-total-variance pool
``avg v + avg (m - M)^2``. The raw-moment formula ``max(avg(v + m^2) - M^2, 0)`` of SN and "Four
Things" is the same number in exact arithmetic (never negative, so the clamp never acts), without
its float32 cancellation on data whose mean is large against its spread (docs/methods.md, "Precision").
Output: ``y = w (x - mu) / sqrt(var + eps) + b`` (native eval-mode ``F.batch_norm`` on ``xv``).

Stages (SeqNorm has two): stage ``s`` normalizes the previous stage's output, whose unit moments
follow from ``r_s = 1 / sqrt(var_s + eps)``: mean ``(m_s - mu_s) r_s``, variance ``v_s r_s^2``; so
every stage works on ``(K,)`` moments and ``y = w ((x - m) P + m_out) + b`` with ``P`` the product of
the stages' ``r`` and ``m_out`` the last stage's output mean.

Backward (analytic, no graph of small ops): one native reduction pass gives per unit
``sum g`` and ``sum g (x - m)`` (:data:`_BN_BACKWARD`); the statistics' adjoints follow from the pooling
(an average broadcast back is its own adjoint); then, from ``dm/dx = 1/n`` and
``dv/dx = 2 (x - m)/n`` per unit of ``n`` values, ``dx = scale g + (2 g_v / n) (x - m) + g_m / n``, in
elementwise passes that write one output tensor (``x - m``, ``*= 2 g_v / n``, ``+= g_m / n``,
``+= scale g``). The centred term keeps float32 gradients exact where ``x`` is near its unit's mean
(a unit of one value, data offset by many standard deviations), where ``B x - B m`` would cancel;
likewise a pooled variance's adjoint keeps its path through the set mean,
``dV/dm_k = 2/n (dm_k - avg dm)``, whose last term is 0 in exact arithmetic and the rounding of ``M``
in float32 (docs/methods.md, "Precision"). The upstream gradient is first laid out like ``xv``
(:func:`~.layout.laid_out_as`: the native reduction misreads another layout).

A *part* is :class:`Own`, :class:`Const` (the ``index``-th constant, shape ``(K,)``) or
:class:`Pooled` (the set mean in a stage's ``mean_parts``, the set variance in its ``var_parts``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .layout import laid_out_as
from .moments import channel_moments


@dataclass(frozen=True)
class Own:
    """The unit's own mean (in ``mean_parts``) or biased variance (in ``var_parts``)."""


@dataclass(frozen=True)
class Const:
    """The ``index``-th constant of ``consts`` (shape ``(K,)``, e.g. a running statistic per unit)."""

    index: int


@dataclass(frozen=True)
class Pooled:
    """The statistic of the unit's set: the units reshaped to ``shape`` and averaged over ``dims``
    (the set mean ``M`` in ``mean_parts``, the set variance ``avg v + avg (m - M)^2`` in ``var_parts``)."""

    shape: tuple[int, ...]
    dims: tuple[int, ...]


Part = Own | Const | Pooled


class Stage(NamedTuple):
    """One normalization of the units: the parts mixed into ``mu`` and into ``var``."""

    mean_parts: tuple[Part, ...]
    var_parts: tuple[Part, ...]


class Plan(NamedTuple):
    """The node's static arguments: ``affine_layout = (before, after)`` (unit ``k`` of
    ``(before, C, after)`` has channel ``c``) and the stages, applied one after the other."""

    affine_layout: tuple[int, int]
    stages: tuple[Stage, ...]


class SetStatistics(NamedTuple):
    """One stage's set statistics, in part order: the set mean of each :class:`Pooled` mean part and
    the set variance of each :class:`Pooled` variance part (set-level shapes, ``keepdim``)."""

    means: tuple[Tensor, ...]
    variances: tuple[Tensor, ...]


class PooledSetOutput(NamedTuple):
    """What :func:`pooled_set_norm` returns: the output ``y`` (``xv``'s shape), the units' own mean
    and biased variance ``(K,)`` and each stage's :class:`SetStatistics`."""

    y: Tensor
    unit_mean: Tensor
    unit_var: Tensor
    set_statistics: tuple[SetStatistics, ...]


class StageRecord(NamedTuple):
    """What the backward needs of one stage: ``m - M`` of each pooled variance part, the stacked
    parts of the mixtures (``None`` without weights), the stage's input unit mean ``m_in``, the
    product ``scale_in`` of the earlier stages' ``r`` (``None`` for the first), ``mu`` and ``r``."""

    centred: tuple[Tensor, ...]
    mean_stack: Tensor | None
    var_stack: Tensor | None
    m_in: Tensor
    scale_in: Tensor | None
    mu: Tensor
    r: Tensor


class _Tape:
    """The forward's records (:class:`StageRecord`), in stage order, flattened for ``save_for_backward`` and
    read back with the plan (which says how many pooled variance parts each stage has)."""

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    def record(self, record: StageRecord) -> None:
        self.records.append(record)

    def tensors(self) -> list[Tensor | None]:
        flat: list[Tensor | None] = []
        for record in self.records:
            flat += (*record.centred, *record[1:])
        return flat

    @staticmethod
    def read(tensors: Sequence[Tensor | None], stages: Sequence[Stage]) -> list[StageRecord]:
        records, at = [], 0
        fixed = len(StageRecord._fields) - 1  # the fields after ``centred``
        for stage in stages:
            n = sum(isinstance(part, Pooled) for part in stage.var_parts)
            fields = tensors[at : at + n + fixed]
            records.append(StageRecord(tuple(fields[:n]), *fields[n:]))
            at += n + fixed
        return records


#: ``native_batch_norm_backward`` in eval mode with ``running_mean = m``, ``running_var = 1`` and
#: ``eps = 0`` normalizes as ``x_hat = (x - m) / sqrt(1 + 0) = x - m``, so its weight gradient
#: ``sum g x_hat`` is ``sum g (x - m)`` and its bias gradient ``sum g``, per unit, in one fused pass.
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


def _stage_forward(m: Tensor, v: Tensor, stage: Stage, consts, mean_weights, var_weights, eps):
    """One stage's statistics from its units' moments ``m``, ``v`` ``(K,)``: ``(mu, var, r, centred,
    mean_stack, var_stack, set_statistics)`` with ``r = 1 / sqrt(var + eps)`` per unit, ``centred`` the
    ``m - M`` of each pooled variance part and the stacks those of :func:`_mixed`."""
    set_means: dict[tuple, Tensor] = {}  # (shape, dims) -> set mean: a mean part and a variance part may share it
    means, reported_means = [], []
    for part in stage.mean_parts:
        if isinstance(part, Own):
            means.append(m)
        elif isinstance(part, Const):
            means.append(consts[part.index])
        else:
            M = set_means[part.shape, part.dims] = m.view(part.shape).mean(part.dims, keepdim=True)
            reported_means.append(M)
            means.append(_spread(M, part.shape))
    variances, reported_vars, centred = [], [], []
    for part in stage.var_parts:
        if isinstance(part, Own):
            variances.append(v)
        elif isinstance(part, Const):
            variances.append(consts[part.index])
        else:
            M = set_means.get((part.shape, part.dims))
            if M is None:
                M = set_means[part.shape, part.dims] = m.view(part.shape).mean(part.dims, keepdim=True)
            dm = m.view(part.shape) - M
            V = (v.view(part.shape) + dm * dm).mean(part.dims, keepdim=True)  # law of total variance
            reported_vars.append(V)
            centred.append(dm)
            variances.append(_spread(V, part.shape))
    mu, mean_stack = _mixed(means, mean_weights)
    var, var_stack = _mixed(variances, var_weights)
    statistics = SetStatistics(tuple(reported_means), tuple(reported_vars))
    return mu, var, torch.rsqrt(var + eps), tuple(centred), mean_stack, var_stack, statistics


def _stage_backward(g_mu, g_var, stage: Stage, mean_weights, var_weights, record: StageRecord):
    """Adjoints of one stage's statistics: ``(g_m, g_v)`` of its units' moments (``None`` when
    nothing depends on them) and the gradients of the mixture weights (``None`` without)."""
    g_m = g_v = None
    g_means = None if mean_weights is None else mean_weights.unsqueeze(1) * g_mu  # (J, K): part j's share
    g_vars = None if var_weights is None else var_weights.unsqueeze(1) * g_var
    for j, part in enumerate(stage.mean_parts):
        gj = g_mu if mean_weights is None else g_means[j]
        if isinstance(part, Own):
            g_m = _add(g_m, gj)
        elif isinstance(part, Pooled):
            g_m = _add(g_m, gj.view(part.shape).mean(part.dims, keepdim=True), part.shape)
    centred = iter(record.centred)
    for j, part in enumerate(stage.var_parts):
        gj = g_var if var_weights is None else g_vars[j]
        if isinstance(part, Own):
            g_v = _add(g_v, gj)
        elif isinstance(part, Pooled):
            dm = next(centred)
            P = gj.view(part.shape).mean(part.dims, keepdim=True)
            g_v = _add(g_v, P, part.shape)
            # dV/dm_k = 2/n (dm_k - avg dm), the second term through M = avg m: 0 in exact arithmetic,
            # in float32 avg dm is M's rounding, which 2 P dm alone would carry to every unit of the set
            dm_centred = dm - dm.mean(part.dims, keepdim=True)
            if g_m is None:
                g_m = (dm_centred * (2.0 * P)).view(-1)
            else:
                g_m = torch.addcmul(g_m.view(part.shape), dm_centred, P, value=2.0).view(-1)
    g_mean_weights = None if mean_weights is None else (record.mean_stack * g_mu).sum(1)
    g_var_weights = None if var_weights is None else (record.var_stack * g_var).sum(1)
    return g_m, g_v, g_mean_weights, g_var_weights


class _Forward(NamedTuple):
    y: Tensor
    m: Tensor
    v: Tensor
    set_statistics: tuple[SetStatistics, ...]
    scale: Tensor  # P, the product of the stages' r
    m_out: Tensor  # the last stage's output mean
    mean_weights: Tensor | None
    var_weights: Tensor | None
    tape: _Tape


def _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan: Plan, eps, consts) -> _Forward:
    """The forward of :class:`_PooledSetNorm` as a plain function (also the path with nothing to differentiate)."""
    layout, stages = plan
    m, v = channel_moments(xv)
    mean_weights = None if mean_logits is None else torch.softmax(mean_logits.to(m.dtype), 0)
    var_weights = None if var_logits is None else torch.softmax(var_logits.to(m.dtype), 0)
    tape = _Tape()
    statistics = []
    m_s, v_s, P = m, v, None  # P: the product of the stages' r so far
    last = len(stages) - 1
    for s, stage in enumerate(stages):
        mixing = s == last  # the mixture weights mix the last stage's parts
        mu, var, r, centred, mean_stack, var_stack, stage_statistics = _stage_forward(
            m_s, v_s, stage, consts, mean_weights if mixing else None, var_weights if mixing else None, eps
        )
        statistics.append(stage_statistics)
        tape.record(StageRecord(centred, mean_stack, var_stack, m_s, P, mu, r))
        P = r if P is None else P * r
        m_s = (m_s - mu) * r
        if s != last:
            v_s = v_s * (r * r)
    w, b = _expand_affine(weight, layout), _expand_affine(bias, layout)
    if last == 0:  # y = w (x - mu) / sqrt(var + eps) + b
        y = torch.batch_norm(xv, w, b, mu, var, False, 0.0, eps, False)
    else:  # y = w ((x - m) P + m_out) + b: eval-mode BN with mean m, var 1, eps 0 is x - m, then scale and shift
        scale = P if w is None else w * P
        shift = m_s if w is None else w * m_s
        y = torch.batch_norm(
            xv, scale, shift if b is None else shift + b, m, torch.ones_like(m), False, 0.0, 0.0, False
        )
    return _Forward(y, m, v, tuple(statistics), P, m_s, mean_weights, var_weights, tape)


def _flat(statistics: Sequence[SetStatistics]) -> list[Tensor]:
    return [t for stage in statistics for t in (*stage.means, *stage.variances)]


def _unflat(tensors: Sequence[Tensor], stages: Sequence[Stage]) -> tuple[SetStatistics, ...]:
    out, at = [], 0
    for stage in stages:
        n_means = sum(isinstance(part, Pooled) for part in stage.mean_parts)
        n_vars = sum(isinstance(part, Pooled) for part in stage.var_parts)
        out.append(
            SetStatistics(tuple(tensors[at : at + n_means]), tuple(tensors[at + n_means : at + n_means + n_vars]))
        )
        at += n_means + n_vars
    return tuple(out)


class _PooledSetNorm(torch.autograd.Function):
    """``(xv, weight, bias, mean_logits, var_logits, plan, eps, *consts) -> (y, m, v, *set_stats)``.

    ``plan`` a :class:`Plan`; ``set_stats`` the stages' :class:`SetStatistics` flattened in stage
    order (means, then variances). Only ``y`` is differentiable. The small per-unit tensors of the
    forward (its :class:`_Tape`) are kept for the backward in one flat ``save_for_backward`` list.
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, plan, eps, *consts):
        out = _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan, eps, consts)
        kept = (out.scale, out.m_out, out.mean_weights, out.var_weights)
        ctx.save_for_backward(xv, weight, out.m, out.v, mean_logits, var_logits, *kept, *out.tape.tensors())
        ctx.plan = plan
        reported = _flat(out.set_statistics)
        ctx.mark_non_differentiable(out.m, out.v, *reported)
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics outputs
        return (out.y, out.m, out.v, *reported)

    @staticmethod
    @once_differentiable  # a second derivative would need its own formula: raise, don't be wrong
    def backward(ctx, g, *_):
        if g is None:  # the output took no part in the loss
            return (None,) * len(ctx.needs_input_grad)
        xv, weight, m, v, mean_logits, var_logits, P, m_out, mean_weights, var_weights, *taped = ctx.saved_tensors
        layout, stages = ctx.plan
        records = _Tape.read(taped, stages)
        K = xv.shape[1]
        g = laid_out_as(g, xv.stride())
        # per unit: sum g (x - m) and sum g, one fused native pass (see _BN_BACKWARD)
        _, s_gc, s_g = _BN_BACKWARD(g, xv, None, m, torch.ones_like(m), None, None, False, 0.0, [False, True, True])
        # y = w ((x - m) P + m_out) + b: the gradients of w, b and the cotangents of P, m_out
        last = len(stages) - 1
        own_mean = last == 0 and stages[0].mean_parts == (Own(),)  # m_out = 0
        if ctx.needs_input_grad[1]:
            gw = _reduce_affine(P * s_gc if own_mean else P * s_gc + m_out * s_g, layout)
        else:
            gw = None
        gb = _reduce_affine(s_g, layout) if ctx.needs_input_grad[2] else None
        w = _expand_affine(weight, layout)
        scale = P if w is None else w * P
        g_P = s_gc if w is None else w * s_gc
        g_mo = s_g if w is None else w * s_g
        g_v = g_mean_weights = g_var_weights = None
        for s in range(last, -1, -1):
            record = records[s]
            r, mu, P_in, m_in = record.r, record.mu, record.scale_in, record.m_in
            g_r = g_P if P_in is None else g_P * P_in
            if not (s == 0 and own_mean):
                g_r = g_r + g_mo * (m_in - mu)
            g_mu = g_mo * -r
            # the m_in -> m_s path: for one stage it cancels with the output's explicit -m term
            g_mo = None if s == 0 and last == 0 else g_mo * r
            mixing = s == last
            gm_s, gv_s, gmw, gvw = _stage_backward(
                g_mu,
                (-0.5 * g_r) * r * r * r,
                stages[s],
                mean_weights if mixing else None,
                var_weights if mixing else None,
                record,
            )
            if mixing:
                g_mean_weights, g_var_weights = gmw, gvw
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
            _softmax_grad(mean_weights, g_mean_weights, mean_logits.dtype)
            if g_mean_weights is not None and ctx.needs_input_grad[3]
            else None
        )
        g_var_logits = (
            _softmax_grad(var_weights, g_var_weights, var_logits.dtype)
            if g_var_weights is not None and ctx.needs_input_grad[4]
            else None
        )
        return (gx, gw, gb, g_mean_logits, g_var_logits, None, None) + (None,) * (len(ctx.needs_input_grad) - 7)


def pooled_set_norm(
    xv: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    affine_layout: tuple[int, int],
    stages: Sequence[Stage],
    eps: float,
    consts: tuple[Tensor, ...] = (),
    mean_logits: Tensor | None = None,
    var_logits: Tensor | None = None,
) -> PooledSetOutput:
    """Normalize the units (dim 1) of ``xv`` with pooled statistics (see the module docstring).

    Args:
        xv: the input viewed so that its units are dim 1, in the compute dtype.
        weight, bias: per-channel affine ``(C,)`` or ``None``; ``affine_layout = (before, after)``
            says how units map to channels: unit ``k`` of ``(before, C, after)`` has channel ``c``.
        stages: :class:`Stage` values (or ``(mean_parts, var_parts)`` pairs), one normalization
            each, of the previous one's output (SeqNorm has two); several parts of the last stage
            are mixed with ``softmax(mean_logits)`` / ``softmax(var_logits)``.
        consts: the ``(K,)`` constants that :class:`Const` parts name (e.g. running statistics).

    Returns:
        A :class:`PooledSetOutput`: ``(y, unit_mean, unit_var, set_statistics)``.
    """
    plan = Plan(tuple(affine_layout), tuple(Stage(tuple(mp), tuple(vp)) for mp, vp in stages))
    inputs = (xv, weight, bias, mean_logits, var_logits)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, m, v, *reported = _PooledSetNorm.apply(*inputs, plan, eps, *consts)
        return PooledSetOutput(y, m, v, _unflat(reported, plan.stages))
    out = _pooled_forward(*inputs, plan, eps, consts)  # nothing to differentiate: no node
    return PooledSetOutput(out.y, out.m, out.v, out.set_statistics)


def stage_statistics(
    m: Tensor,
    v: Tensor,
    stage: Stage,
    mean_weights: Tensor | None,
    var_weights: Tensor | None,
    pool: Callable[[Pooled], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor, SetStatistics]:
    """One training stage's ``mu`` and ``var`` per unit as differentiable tensor expressions (the
    synchronized paths, outside the node), and its set statistics: the units' own moments ``m``,
    ``v`` and ``pool(part)``, a :class:`Pooled` part's set mean and variance (e.g. pooled across
    processes) in a shape that broadcasts against ``m``; ``sum_j w_j part_j`` with the weights (a
    single part without). :class:`Const` parts are inference-only and refused."""
    pools: dict[Pooled, tuple[Tensor, Tensor]] = {}  # a mean part and a variance part may share a pool
    reported: tuple[list[Tensor], list[Tensor]] = ([], [])

    def terms(parts: tuple[Part, ...], own: Tensor, k: int) -> list[Tensor]:  # k: 0 means, 1 variances
        out = []
        for part in parts:
            if isinstance(part, Const):
                raise ValueError("stage_statistics computes training statistics; a Const part is inference-only")
            if isinstance(part, Own):
                out.append(own)
                continue
            if part not in pools:
                pools[part] = pool(part)
            statistic = pools[part][k]
            reported[k].append(statistic)
            out.append(statistic)
        return out

    mu = _weighted_sum(terms(stage.mean_parts, m, 0), mean_weights)
    var = _weighted_sum(terms(stage.var_parts, v, 1), var_weights)
    return mu, var, SetStatistics(tuple(reported[0]), tuple(reported[1]))


def _weighted_sum(parts: list[Tensor], weights: Tensor | None) -> Tensor:
    """``w_0 p_0 + w_1 p_1 + ...`` left to right (a single part without weights: as is)."""
    if weights is None:
        return parts[0]
    total = weights[0] * parts[0]
    for j in range(1, len(parts)):
        total = total + weights[j] * parts[j]
    return total


def channel_group_part(C: int, groups: int) -> Part:
    """A part over channel units ``(C,)`` whose sets are ``groups`` groups of contiguous channels."""
    return Own() if groups == C else Pooled((groups, C // groups), (1,))


def row_part(N: int, C: int, groups: int, batch: bool) -> Part:
    """A part over ``(example, channel)`` row units ``(N*C,)``: sets of ``C/groups`` contiguous
    channels, within one example or (``batch``) over the batch."""
    if groups == C and not batch:
        return Own()
    return Pooled((N, groups, C // groups), (0, 2) if batch else (2,))
