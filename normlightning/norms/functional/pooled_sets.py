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
A single stage whose variance parts are constants or sets of all units (hn's ``en:1``) needs no ``v``:
such a set's variance is ``avg (x - M)^2`` over ``xv``, the same number in two ops on ``xv``.
Output: ``y = w (x - mu) / sqrt(var + eps) + b`` (native eval-mode ``F.batch_norm`` on ``xv``, given
``var + eps`` and ``eps = 0``: the per-unit copy of a set variance is the sum that adds ``eps``).

Op count (issue 23: each small op is a GPU kernel launch): the statistics are kept at set level and
broadcast inside the ops that combine them; a mixture of both ``mu`` and ``var`` is one stack (whose further
rows copy a single stage's affine per unit) and one batched product (one softmax for both logits); a pooled
variance's ``m - M`` and ``v + (m - M)^2`` share one mean; ``addcmul``, batched products and scalar factors
folded into the next op replace multiply-then-add chains.

Stages (SeqNorm has two): stage ``s`` normalizes the previous stage's output, whose unit moments
follow from ``r_s = 1 / sqrt(var_s + eps)``: mean ``(m_s - mu_s) r_s``, variance ``v_s r_s^2``; so
every stage works on ``(K,)`` moments and ``y = w ((x - m) P + m_out) + b`` with ``P`` the product of
the stages' ``r`` and ``m_out`` the last stage's output mean.

Backward (analytic, no graph of small ops): one native reduction pass gives per unit ``sum g`` and the
weight's gradient ``sum g x_hat`` (:data:`_BN_BACKWARD`: a single stage reduces about its ``mu``, several about
``m``, ``sum g (x - m) P``); the statistics' adjoints follow from the pooling (an average
broadcast back is its own adjoint), stage by stage from the last with ``g_r r = G_P + g_mo m_next``
(``G_P = g_P P``: ``w sum g (x - m) P`` at the last stage, gaining ``g_v_in v_in`` at each earlier one)
and accumulate with their ``1/n``, ``2/n`` already applied (:class:`_Accumulator`); then, from ``dm/dx =
1/n`` and ``dv/dx = 2 (x - m)/n`` per unit of ``n`` values, ``dx = scale g + (2 g_v / n) (x - m) + g_m /
n``, in elementwise passes that write one output tensor (``x - m``, ``*= 2 g_v / n``, ``+= g_m / n``,
``+= scale g``). The centred term keeps float32 gradients exact where ``x`` is near its unit's mean (a
unit of one value, data offset by many standard deviations), where ``B x - B m`` would cancel; likewise
a pooled variance's adjoint keeps its path through the set mean, ``dV/dm_k = 2/n (dm_k - avg dm)``,
whose last term is 0 in exact arithmetic and the rounding of ``M`` in float32 (docs/methods.md,
"Precision"; the forward forms ``avg dm``). A mixture of one own and pooled parts in both ``mu`` and ``var``
(SN) has formulas of its own that handle the two mixtures as the rows of one tensor
(:func:`_joint_mixture_backward`). The upstream gradient is first laid out like ``xv``
(:func:`~.layout.laid_out_as`: the native reduction misreads another layout).

A *part* is :class:`Own`, :class:`Const` (the ``index``-th constant, shape ``(K,)``) or
:class:`Pooled` (the set mean in a stage's ``mean_parts``, the set variance in its ``var_parts``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused_ops import squared_deviations
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
    and biased variance ``(K,)`` (``None`` where the plan needs none, :func:`_needs_unit_var`) and each
    stage's :class:`SetStatistics`."""

    y: Tensor
    unit_mean: Tensor
    unit_var: Tensor | None
    set_statistics: tuple[SetStatistics, ...]


class StageRecord(NamedTuple):
    """What the backward needs of one stage: ``m - M`` of each pooled variance part and its set mean ``avg (m -
    M)`` (``None`` where the forward did not form it: a one-set part without ``v``), the stacked
    weighted parts ``(J, K)`` (the mean mixture's, then the variance mixture's; ``None`` without
    weights), ``var + eps`` and ``r`` per unit, the product ``P`` of this and the earlier stages'
    ``r``, the stage's output unit mean ``m_next = (m_in - mu) r`` (``None`` for a single stage),
    its input unit variance ``v_in`` (``None`` for the first) and, for a single stage, its mean ``mu``
    per unit (``None`` for several)."""

    centred: tuple[Tensor, ...]
    centred_means: tuple[Tensor | None, ...]
    stack: Tensor | None
    var_eps: Tensor
    r: Tensor
    P: Tensor
    m_next: Tensor | None
    v_in: Tensor | None
    mu: Tensor | None


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
            flat += (*record.centred, *record.centred_means, *record[2:])
        return flat

    @staticmethod
    def read(tensors: Sequence[Tensor | None], stages: Sequence[Stage]) -> list[StageRecord]:
        records, at = [], 0
        fixed = len(StageRecord._fields) - 2  # the fields after ``centred_means``
        for stage in stages:
            n = sum(isinstance(part, Pooled) for part in stage.var_parts)
            fields = tensors[at : at + 2 * n + fixed]
            records.append(StageRecord(tuple(fields[:n]), tuple(fields[n : 2 * n]), *fields[2 * n :]))
            at += 2 * n + fixed
        return records


#: ``native_batch_norm_backward`` in eval mode with ``running_mean = m``, ``running_var = u`` and
#: ``eps = 0`` normalizes as ``x_hat = (x - m) / sqrt(u)``, so its weight gradient is
#: ``sum g (x - m) / sqrt(u)`` and its bias gradient ``sum g``, per unit, in one fused pass
#: (``u = var + eps`` of a single stage: ``sum g (x - m) r``; ``u = 1``: ``sum g (x - m)``).
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _softmax_grad(weights: Tensor, g_weights: Tensor) -> Tensor:
    """``softmax`` backward along the last dim, ``d logits = s * (g - sum s g)``, in one native op."""
    return torch.ops.aten._softmax_backward_data(g_weights, weights, weights.dim() - 1, weights.dtype)


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
    """Per-unit ``(..., K)`` gradients -> per-channel ``(..., C)`` (the adjoint of :func:`_expand_affine`)."""
    if layout == (1, 1):
        return t
    before, after = layout
    return t.view(*t.shape[:-1], before, -1, after).sum((-3, -1))


def _times_affine(t: Tensor, a: Tensor | None, layout: tuple[int, int]) -> Tensor:
    """``a t`` per unit ``(K,)`` for a per-channel ``a`` ``(C,)`` (``t`` itself for ``a = None``), one op
    (broadcast over the ``(before, C, after)`` layout, no per-unit copy of ``a``)."""
    if a is None:
        return t
    if layout == (1, 1):
        return a * t
    before, after = layout
    return (a.view(1, -1, 1) * t.view(before, -1, after)).view(-1)


class _Accumulator:
    """``alpha`` times a sum of per-unit terms, ``total`` ``(K,)`` (``None`` while empty): each term
    is added in one op, a set-level term (keepdim, sets of units shaped ``shape``) broadcast over its set."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.total: Tensor | None = None

    def add(self, term: Tensor, shape=None, alpha: float = 1.0, scaled: bool = False) -> None:
        """``total += self.alpha * alpha * term`` (``scaled``: ``total += term``, already scaled)."""
        a = 1.0 if scaled else self.alpha * alpha
        if self.total is not None:
            self.total = torch.add(self.total.view(shape or (-1,)), term, alpha=a).view(-1)
        elif shape is None and a == 1.0:
            self.total = term
        else:  # a real contiguous (K,) tensor (see _spread), in the same op as the scaling
            self.total = torch.mul(term if shape is None else term.expand(shape), a).view(-1)

    def add_product(self, t1: Tensor, t2: Tensor, shape, value: float = 1.0) -> None:
        """``total += value t1 t2`` (``t1``, ``t2`` in the units' ``shape``, ``None``: ``(K,)``; no
        ``alpha``: ``value`` scales)."""
        if self.total is None:
            product = t1 * t2
            self.total = (product if value == 1.0 else product.mul_(value)).view(-1)
        else:
            self.total = torch.addcmul(self.total.view(shape or (-1,)), t1, t2, value=value).view(-1)


def _set_mean(m: Tensor, part: Pooled) -> Tensor:
    """The mean of ``m`` ``(K,)`` over each of ``part``'s sets (set level, keepdim)."""
    return m.view(part.shape).mean(part.dims, keepdim=True)


def _in_shape(t: Tensor, layout: tuple[int, int], shape) -> Tensor | None:
    """A per-channel ``t`` ``(C,)`` as a view broadcast to units shaped ``shape`` laid out as ``(before, C,
    after)`` (:func:`_expand_affine` without the copy), where ``shape`` is ``(before, C)`` or ``(before, C,
    after)``; else ``None``."""
    before, after = layout
    C = t.shape[0]
    if tuple(shape) == (before, C, after):
        return t.view(1, C, 1).expand(shape)
    if after == 1 and tuple(shape) == (before, C):
        return t.view(1, C).expand(shape)
    return None


def _mixtures(mean_terms, var_terms, weights: Tensor | None, weighted: tuple[bool, bool], riders=(), layout=(1, 1)):
    """``(mu, var, stack, rider_rows)`` from the stage's terms ``(t, shape)`` (``shape = None``: per unit
    ``(K,)``; else set-level, keepdim, for units shaped ``shape``): a single term is returned as is; a
    mixture (``weighted``: mean, var) is ``sum_j w_j t_j`` with ``weights`` the weighted mixtures' weights
    concatenated ``(J,)``, both mixtures in one stack ``(J, K)`` (kept for the weights' gradient) and one
    batched product ``(2, 1, J/2) @ (2, J/2, K)`` where both have ``J/2`` parts; ``mu``/``var`` come back as
    terms. ``riders``, per-channel tensors ``(C,)`` (the affine, units laid out as ``layout``), are copied
    per unit ``(K,)`` as further rows of the same stack where its terms share one set shape
    (``rider_rows``; else ``None``, also without riders or a mixture)."""
    if not any(weighted):
        return mean_terms[0], var_terms[0], None, None
    mixed = [terms for terms, w in zip((mean_terms, var_terms), weighted) if w]
    terms = [t for ts in mixed for t in ts]
    shapes = {shape for _, shape in terms if shape is not None}
    rider_views = None
    if len(shapes) == 1:  # the stack copies the broadcast set statistics: no spread of its own
        (shape,) = shapes
        parts = [t.view(shape) if s is None else t.expand(shape) for t, s in terms]
        rider_views = [_in_shape(t, layout, shape) for t in riders]
        if not riders or any(t is None for t in rider_views):
            rider_views = None
    else:
        parts = [t if s is None else _spread(t, s) for t, s in terms]
    rows = torch.stack(parts + (rider_views or [])).view(len(parts) + len(rider_views or ()), -1)
    stack = rows[: len(parts)]
    if len(mixed) == 2 and len(mixed[0]) == len(mixed[1]):
        J = len(mixed[0])
        sums = list(torch.bmm(weights.view(2, 1, J), stack.view(2, J, -1)).view(2, -1).unbind(0))
    else:
        products = weights.unsqueeze(1) * stack
        sums = [chunk.sum(0) for chunk in products.split([len(ts) for ts in mixed])]
    out = [(sums.pop(0), None) if w else terms_[0] for terms_, w in zip((mean_terms, var_terms), weighted)]
    return out[0], out[1], stack, None if rider_views is None else list(rows[len(parts) :].unbind(0))


def _one_set(part: Part) -> bool:
    """Whether ``part`` pools every unit into one set (e.g. hn's ``en:1``)."""
    return isinstance(part, Pooled) and all(size == 1 or d in part.dims for d, size in enumerate(part.shape))


def _needs_unit_var(stages: Sequence[Stage]) -> bool:
    """Whether the units' own variances ``v`` are read: not by a single stage whose variance parts are
    constants or one-set parts (their variance comes from ``xv`` itself, :func:`_stage_forward`)."""
    return len(stages) > 1 or not all(isinstance(p, Const) or _one_set(p) for p in stages[0].var_parts)


def _stage_forward(
    m: Tensor,
    v: Tensor | None,
    stage: Stage,
    consts,
    weights,
    weighted,
    eps,
    single: bool,
    xv=None,
    riders=(),
    layout=(1, 1),
):
    """One stage's statistics from its units' moments ``m``, ``v`` ``(K,)``: ``(mu, var_eps, r,
    m_next, centred, stack, set_statistics, affine_rows)`` with ``mu`` per unit ``(K,)`` for a ``single`` stage (the
    output's batch-norm pass reads it; ``None`` otherwise), ``var_eps = var + eps`` and
    ``r = 1 / sqrt(var + eps)`` per unit, ``m_next = (m - mu) r`` (``None`` for a single stage: its
    backward reduces about ``mu``), ``centred`` the ``m - M`` of each pooled variance part and their set means
    (:class:`StageRecord`), ``stack`` and ``affine_rows`` those of :func:`_mixtures` (its ``rider_rows``: the
    ``riders`` per unit). Without ``v``, a one-set part's variance is ``avg (x - M)^2`` over ``xv`` (two ops;
    equal to the pool, which needs ``v``)."""
    set_means: dict[tuple, Tensor] = {}  # (shape, dims) -> set mean: a mean part and a variance part may share it
    deviations: dict[tuple, Tensor] = {}  # (shape, dims) -> m - M, shaped like the units' sets
    mean_terms, reported_means = [], []
    for part in stage.mean_parts:
        if isinstance(part, Own):
            mean_terms.append((m, None))
        elif isinstance(part, Const):
            mean_terms.append((consts[part.index], None))
        else:
            M = set_means[part.shape, part.dims] = _set_mean(m, part)
            reported_means.append(M)
            mean_terms.append((M, part.shape))
    var_terms, reported_vars, centred, centred_means = [], [], [], []
    for part in stage.var_parts:
        if isinstance(part, Own):
            var_terms.append((v, None))
        elif isinstance(part, Const):
            var_terms.append((consts[part.index], None))
        else:
            key = part.shape, part.dims
            if key not in set_means:
                set_means[key] = _set_mean(m, part)
            if v is None:  # one set: the variance of all of xv about its mean M
                dm = m.view(part.shape) - set_means[key]
                M = set_means[key].view([1] * xv.dim())
                V = squared_deviations(xv, M).mean().view(set_means[key].shape)
                avg_dm = None
            else:  # law of total variance; the one mean of (dm, v + dm^2) also gives avg dm, which the backward reads
                both = torch.empty((2, *part.shape), dtype=m.dtype, device=m.device)
                dm = torch.sub(m.view(part.shape), set_means[key], out=both[0])
                torch.addcmul(v.view(part.shape), dm, dm, out=both[1])
                avg_dm, V = both.mean(tuple(d + 1 for d in part.dims), keepdim=True).unbind(0)
            deviations[key] = dm
            reported_vars.append(V)
            centred.append(dm)
            centred_means.append(avg_dm)
            var_terms.append((V, part.shape))
    (mu, mu_shape), (var, var_shape), stack, rider_rows = _mixtures(
        mean_terms, var_terms, weights, weighted, riders, layout
    )
    # var + eps as a real contiguous (K,) tensor: the add writes the broadcast set variance out
    var_eps = (var + eps) if var_shape is None else torch.add(var.expand(var_shape), eps).view(-1)
    r = torch.rsqrt(var_eps)
    if single:  # the backward reduces about mu itself (sum g (x - mu) r): no m_next
        m_next = None
    elif mu_shape is None:
        m_next = (m - mu) * r
    else:  # a single pooled mean part: m - M is known where a variance part pools the same sets
        part = stage.mean_parts[0]
        dm = deviations.get((part.shape, part.dims))
        dm = m.view(mu_shape) - mu if dm is None else dm
        m_next = (dm * r.view(mu_shape)).view(-1)
    if single and mu_shape is not None:
        mu = _spread(mu, mu_shape)
    statistics = SetStatistics(tuple(reported_means), tuple(reported_vars))
    return (
        mu if single else None,
        var_eps,
        r,
        m_next,
        (tuple(centred), tuple(centred_means)),
        stack,
        statistics,
        rider_rows,
    )


class _StageAdjoints(NamedTuple):
    """The static part of :func:`_stage_backward` for one stage and mixture flags (computed once per
    plan): the weighted mixtures' sizes ``J``, whether both are weighted with ``J/2`` parts each
    (``joint``), the parts ``j`` pooled alike in both mixtures (``shared``: one average for both), the
    variance parts ``(j, part, centred index)`` pooled first, and the mean parts ``(j, part)``."""

    J: tuple[int, ...]
    joint: bool
    shared: tuple[tuple[int, Pooled, tuple[int, ...]], ...]
    var_parts: tuple[tuple[int, Part, int], ...]
    mean_parts: tuple[tuple[int, Part], ...]


@functools.lru_cache(maxsize=256)
def _stage_adjoints(stage: Stage, weighted: tuple[bool, bool]) -> _StageAdjoints:
    """The :class:`_StageAdjoints` of ``stage`` with the mixtures ``weighted`` (mean, var), cached per plan."""
    J = tuple(len(p) for p, w in zip((stage.mean_parts, stage.var_parts), weighted) if w)
    joint = len(J) == 2 and J[0] == J[1]
    shared = tuple(
        (j, mp, tuple(d + 1 for d in mp.dims))
        for j, (mp, vp) in enumerate(zip(stage.mean_parts, stage.var_parts))
        if joint and isinstance(mp, Pooled) and mp == vp
    )
    pooled = [j for j, p in enumerate(stage.var_parts) if isinstance(p, Pooled)]
    order = pooled + [j for j, p in enumerate(stage.var_parts) if isinstance(p, Own)]
    var_parts = tuple((j, stage.var_parts[j], pooled.index(j) if j in pooled else -1) for j in order)
    mean_parts = tuple((j, p) for j, p in enumerate(stage.mean_parts) if not isinstance(p, Const))
    return _StageAdjoints(J, joint, shared, var_parts, mean_parts)


def _one_pooled_var_term(g_w: Tensor, weight: Tensor | None, stage: Stage, layout, weighted, record: StageRecord, n):
    """``-(1/n) avg_set(w g_w / (var + eps))`` per unit ``(K,)`` shaped like the set's units, in two ops (one
    batched dot per set with the factor folded in, one division by the set's ``var + eps``), where the
    stage's variance is one pooled part over groups of channel units without mixture weights (hn's
    ``en:G``); else ``None``. It is the pooled part's ``alpha_v P`` of :func:`_stage_backward` (``P`` the set
    mean of ``g_var = -w g_w / (2 (var + eps))``, ``alpha_v = 2/n``): the division by the set's one
    ``var + eps`` moves out of the set's average."""
    (part,) = stage.var_parts if len(stage.var_parts) == 1 else (None,)
    if (
        not isinstance(part, Pooled)
        or len(part.shape) != 2
        or part.dims != (1,)
        or layout != (1, 1)
        or any(weighted)
        or weight is None
        or weight.dtype != g_w.dtype
    ):
        return None
    G, L = part.shape
    rows = g_w.view(G, 1, L)
    sums = torch.baddbmm(rows[..., :1], rows, weight.view(G, L, 1), beta=0, alpha=-1.0 / (n * L))  # (beta=0: no input)
    return torch.div(sums.view(G, 1), record.var_eps.view(G, L))


def _recentred(record: StageRecord, c: int, part: Pooled) -> Tensor:
    """``dm - avg dm`` of the stage's ``c``-th pooled variance part (units shaped like its sets): ``avg dm`` is 0 in
    exact arithmetic and in float32 the rounding of the set mean ``M``, which ``dm`` alone would carry to every
    unit of the set (module docstring); the forward's where it formed it."""
    dm, avg_dm = record.centred[c], record.centred_means[c]
    return dm - (dm.mean(part.dims, keepdim=True) if avg_dm is None else avg_dm)


def _joint_weights_grad(stack: Tensor, rows: Tensor, J: int) -> Tensor:
    """The gradient ``(2, J)`` of a mean and a variance mixture of the same ``J`` parts, ``-stack_j . row`` per
    mixture, in one batched product: ``stack`` their stacked terms ``(2 J, K)`` (:func:`_mixtures`), ``rows`` the
    terms' cotangents with their sign flipped, ``(-g_mu, -g_var)`` as ``(2, K)`` (any view of ``2 K`` values)."""
    K = stack.shape[-1]
    stack = stack.view(2, J, K)
    return torch.baddbmm(stack[..., :1], stack, rows.reshape(2, K, 1), beta=0, alpha=-1.0).view(2, J)


class _JointMixture(NamedTuple):
    """A single stage whose mean and variance mixtures are both weighted and mix the same parts: one
    :class:`Own` part (index ``own``) and :class:`Pooled` parts ``(j, part)`` (in order, also that of the
    stage's ``centred`` records) over units of one ``shape`` (SN's IN, LN, BN)."""

    own: int
    pooled: tuple[tuple[int, Pooled], ...]
    shape: tuple[int, ...]


@functools.lru_cache(maxsize=256)
def _joint_mixture(stage: Stage, weighted: tuple[bool, bool]) -> _JointMixture | None:
    """The :class:`_JointMixture` of ``stage`` with the mixtures ``weighted`` (mean, var), or ``None``."""
    if weighted != (True, True) or stage.mean_parts != stage.var_parts:
        return None
    own = [j for j, p in enumerate(stage.var_parts) if isinstance(p, Own)]
    pooled = tuple((j, p) for j, p in enumerate(stage.var_parts) if isinstance(p, Pooled))
    shapes = {p.shape for _, p in pooled}
    if len(own) != 1 or len(shapes) != 1 or len(own) + len(pooled) != len(stage.var_parts):
        return None
    return _JointMixture(own[0], pooled, shapes.pop())


def _joint_mixture_backward(
    s_g, g_w, record: StageRecord, weight, weights, plan: _JointMixture, layout, n, needs_affine
):
    """``(scale, gw, gb, B, C, g_weights)`` of a :class:`_JointMixture` stage, from the per-unit ``s_g = sum g``
    and ``g_w = sum g (x - mu) r`` ``(K,)``: the affine's gradients (``None`` without ``needs_affine``), ``dx = A
    g + B (x - m) + C`` with ``A = scale = w r``, ``B = 2 g_v / n``, ``C = g_m / n`` per unit, and the mixture
    weights' gradient ``(2, J)``.

    ``g_mu = -w r s_g`` and ``g_var = -w r^2 g_w / 2`` (module docstring) are the rows ``(t, g_var_hat) = (-g_mu,
    -2 g_var)`` of one ``(2, K)`` tensor; ``d w_j = stack_j . g_mu``, ``d u_j = stack_j . g_var`` (one batched
    product); the parts' cotangents ``(w_j g_mu / n, 2 u_j g_var / n)`` in one batched outer product ``(2, J,
    K)``, whose own part's rows start ``(C, B)``; each pooled part's two rows averaged over its sets in one op
    ``P``: ``C += P_0 + P_1 (dm - avg dm)``, ``B += P_1`` (a set mean's adjoint, and a pooled variance's through
    ``v`` and through ``m``, see :func:`_stage_backward`)."""
    K = s_g.shape[0]
    J = weights.shape[-1]
    X = torch.stack((s_g, g_w))
    gb, gw = _reduce_affine(X, layout).unbind(0) if needs_affine else (None, None)
    scale = _times_affine(record.r, weight, layout)
    G = X * scale
    G[1].mul_(record.r)
    g_weights = _joint_weights_grad(record.stack, G, J)
    g_weights[1].mul_(0.5)
    rows = G.view(2, 1, K)
    g_both = torch.baddbmm(rows, weights.view(2, J, 1), rows, beta=0, alpha=-1.0 / n)
    shape = plan.shape
    Z = None
    for c, (j, part) in enumerate(plan.pooled):
        P = g_both[:, j].view(2, *shape).mean(tuple(d + 1 for d in part.dims), keepdim=True)
        Z = torch.add(g_both[:, plan.own].view(2, *shape), P) if Z is None else Z.add_(P)
        Z[0].addcmul_(P[1], _recentred(record, c, part))
    C, B = Z.view(2, K).unbind(0)  # (unbind: a tensor's own iteration costs more on CPU)
    return scale, gw, gb, B, C, g_weights


def _stage_backward(
    t_factors, g_var_hat, stage: Stage, weights, weighted, record: StageRecord, acc_m, acc_v, var_term=None
):
    """Adds one stage's statistics' adjoints into ``acc_m`` / ``acc_v`` (the units' ``m`` and ``v``;
    ``acc_v.alpha = 2 acc_m.alpha``) and returns the gradients of the weighted mixtures' weights
    ``(2, J)`` or one ``(J,)`` per weighted mixture (``None`` without weights).

    The cotangents come scaled: ``g_mu = -t`` with ``t = t_factors[0] * t_factors[1]`` (formed only
    where needed; ``t_factors[1] = None``: ``t = t_factors[0]``) and ``g_var = -g_var_hat / 2``. A
    pooled mean part adds ``avg_set g_mu`` to each unit of the set; a pooled variance part
    ``V = avg (v + (m - M)^2)`` adds ``P = avg_set g_var`` to ``g_v`` and ``2 P (dm - avg dm)`` to
    ``g_m`` (see the module docstring). The variance parts go first and the pooled ones before the
    units' own, so that the first term of each sum costs no op of its own. A given ``var_term``
    (:func:`_one_pooled_var_term`) is the one pooled variance part's ``alpha_v P`` (``g_var_hat`` unused)."""
    plan = _stage_adjoints(stage, weighted)
    t = t_factors[0] if t_factors[1] is None else None
    g_weights = None
    g_parts: Sequence[Tensor] = ()  # -w_j g of each weighted part, mean parts first
    set_means: dict[tuple[int, int], Tensor] = {}  # (0 mean / 1 var, j) -> avg_set of that part's cotangent
    if plan.J:
        if weighted[0] and t is None:
            t = t_factors[0] * t_factors[1]
        rows = ([t] if weighted[0] else []) + ([g_var_hat * 0.5] if weighted[1] else [])  # -g_mu, -g_var
        K = g_var_hat.shape[0]
        if plan.joint:
            J = plan.J[0]
            g_rows = torch.stack(rows).view(2, 1, K)
            g_both = weights.view(2, J, 1) * g_rows
            g_parts = g_both.view(-1, K)
            g_weights = _joint_weights_grad(record.stack, g_rows, J)
            for j, part, dims in plan.shared:  # both averages in one op
                both = g_both[:, j].view(2, *part.shape).mean(dims, keepdim=True)
                set_means[0, j], set_means[1, j] = both[0], both[1]
        else:
            g_weights, g_parts = [], []
            blocks_ = zip(weights.split(plan.J), record.stack.view(-1).split([j * K for j in plan.J]), rows)
            for w_k, s_k, row in blocks_:
                g_parts += list(w_k.unsqueeze(1) * row)
                g_weights.append(torch.addmv(w_k, s_k.view(-1, K), row, beta=0, alpha=-1.0))
    n_mean = len(stage.mean_parts) if weighted[0] else 0
    for j, part, c in plan.var_parts:
        g, alpha = (g_parts[n_mean + j], -1.0) if weighted[1] else (g_var_hat, -0.5)
        if c < 0:  # the units' own variance
            acc_v.add(g, alpha=alpha)
            continue
        if var_term is not None:
            term = var_term
        else:
            P = set_means.get((1, j))
            if P is None:
                P = g.view(part.shape).mean(part.dims, keepdim=True)
            # acc_v's term alpha_v P, which times (dm - avg dm) is also acc_m's term (alpha_v = 2 alpha_m)
            term = torch.mul(P.expand(part.shape), acc_v.alpha * alpha)
        acc_v.add(term.view(-1), scaled=True)
        # avg dm: 0 in exact arithmetic, in float32 M's rounding, which 2 P dm alone would carry
        # to every unit of the set
        acc_m.add_product(term, _recentred(record, c, part), part.shape)
    for j, part in plan.mean_parts:
        if weighted[0]:
            g = g_parts[j]
        elif t is None and isinstance(part, Own):  # -t: one multiply-add from t's factors
            acc_m.add_product(*t_factors, None, value=-acc_m.alpha)
            continue
        else:
            if t is None:
                t = t_factors[0] * t_factors[1]
            g = t
        if isinstance(part, Own):
            acc_m.add(g, alpha=-1.0)
        else:
            P = set_means.get((0, j))
            acc_m.add(g.view(part.shape).mean(part.dims, keepdim=True) if P is None else P, part.shape, alpha=-1.0)
    return g_weights


class _Forward(NamedTuple):
    y: Tensor
    m: Tensor
    v: Tensor | None  # None where the plan needs no unit variances
    set_statistics: tuple[SetStatistics, ...]
    weights: Tensor | None  # the weighted mixtures' weights: (2, J) for two of J parts, else (J,) concatenated
    scale: Tensor | None  # w P per unit, for several stages
    ones: Tensor | None  # a (K,) tensor of ones, for several stages
    tape: _Tape


def _mixture_weights(mean_logits, var_logits, dtype) -> Tensor | None:
    """The softmaxes of the logits: ``(2, J)`` for two of one length (one softmax), else ``(J,)``
    concatenated (``None`` without logits)."""
    logits = [t.to(dtype) for t in (mean_logits, var_logits) if t is not None]
    if not logits:
        return None
    if len(logits) == 2 and logits[0].shape == logits[1].shape:
        return torch.softmax(torch.stack(logits), 1)
    return torch.cat([torch.softmax(t, 0) for t in logits]) if len(logits) == 2 else torch.softmax(logits[0], 0)


def _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan: Plan, eps, consts) -> _Forward:
    """The forward of :class:`_PooledSetNorm` as a plain function (also the path with nothing to differentiate)."""
    layout, stages = plan
    if _needs_unit_var(stages):
        m, v = channel_moments(xv)
    else:
        m, v = xv.mean([d for d in range(xv.dim()) if d != 1]), None
    weights = _mixture_weights(mean_logits, var_logits, m.dtype)
    weighted = (mean_logits is not None, var_logits is not None)
    tape = _Tape()
    statistics = []
    # a single stage's per-unit affine, copied in the stack of its mixture where it has one (no copy for (1, 1))
    riders = [] if layout == (1, 1) else [t for t in (weight, bias) if t is not None]
    m_s, v_s, P, v_in = m, v, None, None  # P: the product of the stages' r so far
    last = len(stages) - 1
    for s, stage in enumerate(stages):
        mixing = s == last  # the mixture weights mix the last stage's parts
        mu, var_eps, r, m_next, centred, stack, stage_statistics, affine_rows = _stage_forward(
            m_s,
            v_s,
            stage,
            consts,
            weights.view(-1) if mixing and weights is not None else None,
            weighted if mixing else (False, False),
            eps,
            last == 0,
            xv,
            riders if last == 0 else (),
            layout,
        )
        statistics.append(stage_statistics)
        P = r if P is None else P * r
        tape.record(StageRecord(*centred, stack, var_eps, r, P, m_next, v_in, mu))
        m_s = m_next
        if s != last:
            v_s = v_in = v_s / var_eps  # v r^2
    if last == 0:  # y = w (x - mu) / sqrt(var + eps) + b
        if affine_rows is not None:
            w, b = (None if t is None else affine_rows.pop(0) for t in (weight, bias))
        else:
            w, b = _expand_affine(weight, layout), _expand_affine(bias, layout)
        y = torch.batch_norm(xv, w, b, mu, var_eps, False, 0.0, 0.0, False)
        scale = ones = None
    else:  # y = w ((x - m) P + m_out) + b: eval-mode BN with mean m, var 1, eps 0 is x - m, then scale and shift
        scale = _times_affine(P, weight, layout)
        if bias is None:
            shift = _times_affine(m_s, weight, layout)
        elif weight is None:
            shift = _times_affine(m_s, None, layout) + _expand_affine(bias, layout)
        elif layout == (1, 1):
            shift = torch.addcmul(bias, weight, m_s)
        else:
            before, after = layout
            shift = torch.addcmul(bias.view(1, -1, 1), weight.view(1, -1, 1), m_s.view(before, -1, after)).view(-1)
        ones = torch.ones_like(m)
        y = torch.batch_norm(xv, scale, shift, m, ones, False, 0.0, 0.0, False)
    return _Forward(y, m, v, tuple(statistics), weights, scale, ones, tape)


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
    """``(xv, weight, bias, mean_logits, var_logits, plan, eps, *consts) -> (y, m, v, *set_stats)``
    (without ``v`` where the plan needs no unit variances, :func:`_needs_unit_var`).

    ``plan`` a :class:`Plan`; ``set_stats`` the stages' :class:`SetStatistics` flattened in stage
    order (means, then variances). Only ``y`` is differentiable. The small per-unit tensors of the
    forward (its :class:`_Tape`) are kept for the backward in one flat ``save_for_backward`` list.
    """

    @staticmethod
    def forward(ctx, xv, weight, bias, mean_logits, var_logits, plan, eps, *consts):
        out = _pooled_forward(xv, weight, bias, mean_logits, var_logits, plan, eps, consts)
        kept = (out.weights, out.scale, out.ones)
        ctx.save_for_backward(xv, weight, out.m, *kept, *out.tape.tensors())
        ctx.plan = plan
        ctx.weighted = (mean_logits is not None, var_logits is not None)
        ctx.logit_dtypes = tuple(None if t is None else t.dtype for t in (mean_logits, var_logits))
        reported = _flat(out.set_statistics)
        ctx.mark_non_differentiable(*(t for t in (out.m, out.v, *reported) if t is not None))
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics outputs
        return (out.y, out.m, *([] if out.v is None else [out.v]), *reported)  # no None output: compile

    @staticmethod
    @once_differentiable  # a second derivative would need its own formula: raise, don't be wrong
    def backward(ctx, g, *_):
        if g is None:  # the output took no part in the loss
            return (None,) * len(ctx.needs_input_grad)
        xv, weight, m, weights, scale, ones, *taped = ctx.saved_tensors
        layout, stages = ctx.plan
        records = _Tape.read(taped, stages)
        K = xv.shape[1]
        n = xv.numel() // K
        g = laid_out_as(g, xv.stride())
        last = len(stages) - 1
        final = records[last]
        # y = w ((x - m) P + m_out) + b. Per unit, one fused native pass (see _BN_BACKWARD): sum g and
        # g_w = P sum g x_hat, the weight's gradient per unit (a single stage, y = w (x - mu) r + b:
        # sum g (x - mu) r; several: s_gcP = sum g (x - m) P, and g_w = s_gcP + m_out sum g)
        m_out = final.m_next
        if last == 0:
            _, g_w, s_g = _BN_BACKWARD(
                g, xv, None, final.mu, final.var_eps, None, None, False, 0.0, [False, True, True]
            )
        else:
            _, s_gc, s_g = _BN_BACKWARD(g, xv, None, m, ones, None, None, False, 0.0, [False, True, True])
            s_gcP = s_gc * final.P
            g_w = torch.addcmul(s_gcP, m_out, s_g)
        joint = _joint_mixture(stages[0], ctx.weighted) if last == 0 else None
        if joint is not None:  # a mixture of own and pooled parts of one shape (SN): its own formulas
            needs_affine = any(ctx.needs_input_grad[1:3])
            scale, gw, gb, B, C, g_weights = _joint_mixture_backward(
                s_g, g_w, final, weight, weights, joint, layout, n, needs_affine
            )
            gw = gw if ctx.needs_input_grad[1] else None
            gb = gb if ctx.needs_input_grad[2] else None
        else:
            if last == 0:
                scale = _times_affine(final.r, weight, layout)
            gw = _reduce_affine(g_w, layout) if ctx.needs_input_grad[1] else None
            gb = _reduce_affine(s_g, layout) if ctx.needs_input_grad[2] else None
            # Stage s (from the last): with G_P = g_P P (g_P: the cotangent of the product P of the r so far)
            # and g_mo the cotangent of its output mean m_next, g_r r = G_P + g_mo m_next, so
            # g_var = -g_r r^3 / 2 = -(G_P + g_mo m_next) / (2 var_eps), g_mu = -g_mo r; then the earlier
            # stage's G_P gains g_v_in v_in (v_in = v P^2) and its g_mo gains g_mo r + g_m_in
            var_term = None
            if last == 0:  # G_P + g_mo m_out = w g_w, g_mo r = scale s_g
                var_term = _one_pooled_var_term(g_w, weight, stages[0], layout, ctx.weighted, final, n)
                h = _times_affine(g_w, weight, layout) if var_term is None else None
                t_factors = (scale, s_g)
            else:
                G_P = _times_affine(s_gcP, weight, layout)
                g_mo = _times_affine(s_g, weight, layout)
                h = torch.addcmul(G_P, g_mo, m_out)
                t = g_mo * final.r
                t_factors = (t, None)
            acc_m = acc_v = None
            later_var_terms = []  # (2 g_v_in, P of the stage before) of the later stages' variance adjoints
            g_weights = None
            for s in range(last, -1, -1):
                record = records[s]
                # the first stage's adjoints are the units' m, v and go to dx as C = g_m / n and B = 2 g_v / n
                alpha = 1.0 / n if s == 0 else 1.0
                acc_m, acc_v = _Accumulator(alpha), _Accumulator(2.0 * alpha)
                mixing = s == last
                stage_g_weights = _stage_backward(
                    t_factors,
                    None if var_term is not None else h / record.var_eps,
                    stages[s],
                    weights if mixing else None,
                    ctx.weighted if mixing else (False, False),
                    record,
                    acc_m,
                    acc_v,
                    var_term,
                )
                if mixing:
                    g_weights = stage_g_weights
                if s == 0:
                    break
                previous = records[s - 1]
                g_mo = t if acc_m.total is None else t + acc_m.total
                if acc_v.total is not None:
                    G_P = torch.addcmul(G_P, acc_v.total, record.v_in)
                    later_var_terms.append((acc_v.total, previous.P))
                h = torch.addcmul(G_P, g_mo, previous.m_next)
                t = g_mo * previous.r
                t_factors = (t, None)
            C, B = acc_m.total, acc_v.total
            if last > 0:  # the first stage's m_in is m: its path g_mo r (= t) and the output's explicit -m term
                C = torch.mul(t, 1.0 / n) if C is None else torch.add(C, t, alpha=1.0 / n)
                C = torch.addcmul(C, scale, s_g, value=-1.0 / n)
            for g_v_in, P_before in later_var_terms:  # v_in = v P_before^2: g_v += g_v_in P_before^2
                term = g_v_in * P_before
                B = (
                    torch.mul(term, P_before * (1.0 / n))
                    if B is None
                    else torch.addcmul(B, term, P_before, value=1.0 / n)
                )
        gx = None
        if ctx.needs_input_grad[0]:
            shape = [1, K] + [1] * (xv.dim() - 2)
            if B is None:
                gx = g * scale.view(shape)
                if C is not None:
                    gx.add_(C.view(shape))
            else:  # B (x - m) + C + A g: centred (no cancellation of B x against B m)
                gx = xv - m.view(shape)
                gx.mul_(B.view(shape))  # (torch.addcmul with a broadcast C as self: slower on CPU than two passes)
                if C is not None:
                    gx.add_(C.view(shape))
                gx.addcmul_(g, scale.view(shape))
        g_logits = [None, None]
        if g_weights is not None:
            if isinstance(g_weights, Tensor):  # both mixtures, (2, J)
                found = list(_softmax_grad(weights, g_weights).unbind(0))
            else:
                sizes = [g_k.numel() for g_k in g_weights]
                found = [_softmax_grad(w_k, g_k) for w_k, g_k in zip(weights.split(sizes), g_weights)]
            for k in (0, 1):
                if ctx.weighted[k]:
                    g_logits[k] = found.pop(0)
        g_mean_logits, g_var_logits = (
            g.to(dtype) if g is not None and needed else None
            for g, dtype, needed in zip(g_logits, ctx.logit_dtypes, ctx.needs_input_grad[3:5])
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
        y, m, *rest = _PooledSetNorm.apply(*inputs, plan, eps, *consts)
        v, reported = (rest[0], rest[1:]) if _needs_unit_var(plan.stages) else (None, rest)
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
