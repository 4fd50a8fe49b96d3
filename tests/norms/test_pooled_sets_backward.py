"""The pooled-set node's hand-written backward (functional/pooled_sets.py: ``_stage_backward``, the stage records
and the per-stage statistics) against autograd through a float64 reference written out here, with a random
upstream gradient, for the plans the layers do not build: a mean mixture alone, a mixture with constants and
with sets of two shapes (whose parts pooled alike in both mixtures share one average), several stages with an
own or mixed mean, instance statistics (own mean and variance), variance sets that are not contiguous channel
groups; float32 units of one value far from zero; the SN, HN and SeqNorm layers with several sets and stages
(float32, ``channels_last``); and ``stage_statistics``, ``channel_group_part`` by their definitions.

The reference normalizes the tensor itself stage by stage: per unit (dim 1) the mean ``m`` and biased variance
``v`` over every other dim; a pooled part's set mean ``M = avg m`` and set variance ``avg (v + m^2) - M^2`` (the
raw second moment of the set's values, fine in float64) over its sets (the units reshaped to ``shape``, averaged
over ``dims``); the last stage's parts mixed with ``softmax`` of the logits; ``h = (h - mu) / sqrt(var + eps)``;
then the per-channel affine, unit ``k`` of ``(before, C, after)`` having channel ``c``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from norm_reference import affine, bvar, ghost_train, gn_ref, sn_train

from normlightning.norms import HeterologousNorm, SequentialNorm, SwitchableNorm
from normlightning.norms.functional.pooled_sets import (
    Const,
    Own,
    Pooled,
    Stage,
    channel_group_part,
    pooled_set_norm,
    stage_statistics,
)
from normlightning.norms.op_count import ComputeOpCounter

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

F64 = torch.float64
N, C, S = 4, 6, 5
EPS = 1e-5


def _statistic(part, variance, m, v, consts):
    """A part's mean (or variance) per unit ``(K,)`` from the units' moments: own, a constant, or the set's
    mean ``avg m`` (variance ``avg (v + m^2) - M^2``) spread to the set's units."""
    if isinstance(part, Own):
        return v if variance else m
    if isinstance(part, Const):
        return consts[part.index].double()

    def set_mean(t):
        return t.view(part.shape).mean(part.dims, keepdim=True).expand(part.shape).reshape(-1)

    M = set_mean(m)
    return set_mean(v + m**2) - M**2 if variance else M


def reference(xv, weight, bias, layout, stages, eps=EPS, consts=(), mean_logits=None, var_logits=None):
    """The node's output by the definition (module docstring), in float64 from the given leaves."""
    h = xv.double()
    dims = [d for d in range(h.dim()) if d != 1]
    per_unit = [1, -1] + [1] * (h.dim() - 2)
    for s, (mean_parts, var_parts) in enumerate(stages):
        m = h.mean(dims)
        v = ((h - m.view(per_unit)) ** 2).mean(dims)

        last = s == len(stages) - 1
        mixed = []
        for parts, logits, variance in ((mean_parts, mean_logits, False), (var_parts, var_logits, True)):
            terms = [_statistic(p, variance, m, v, consts) for p in parts]
            if last and logits is not None:
                weights = torch.softmax(logits.double(), 0)
                mixed.append(sum(weights[j] * t for j, t in enumerate(terms)))
            else:
                mixed.append(terms[0])
        mu, var = mixed
        h = (h - mu.view(per_unit)) / torch.sqrt(var + eps).view(per_unit)
    before, after = layout

    def unit(t):
        return t.double().view(1, -1, 1).expand(before, -1, after).reshape(per_unit)

    if weight is not None:
        h = h * unit(weight)
    if bias is not None:
        h = h + unit(bias)
    return h


# name -> (xv shape, affine layout, stages, number of constants, mixture sizes (mean, var))
PLANS = {
    # the mean mixed, the variance one pooled part (no variance weights)
    "rows-mean-mixture": (
        (1, N * C, S),
        (N, 1),
        [((Own(), Pooled((N, C), (0,))), (Pooled((N, C), (1,)),))],
        0,
        (2, 0),
    ),
    # SN's parts with a constant each (running statistics): the same pooled part in both mixtures, not SN's formulas
    "rows-joint-with-constants": (
        (1, N * C, S),
        (N, 1),
        [((Own(), Pooled((N, C), (1,)), Const(0)), (Own(), Pooled((N, C), (1,)), Const(1)))],
        2,
        (3, 3),
    ),
    # the same parts in both mixtures, pooled over sets of two shapes
    "rows-joint-two-set-shapes": (
        (1, N * C, S),
        (N, 1),
        [
            (
                (Own(), Pooled((N, C), (0,)), Pooled((N, 3, 2), (1, 2))),
                (Own(), Pooled((N, C), (0,)), Pooled((N, 3, 2), (1, 2))),
            )
        ],
        0,
        (3, 3),
    ),
    # instance statistics: own mean and own variance
    "rows-own": ((1, N * C, S), (N, 1), [((Own(),), (Own(),))], 0, (0, 0)),
    # the units' own variance twice in the mixture
    "channels-own-variance-twice": (
        (N, C, S),
        (1, 1),
        [((Own(),), (Own(), Pooled((1, C), (1,)), Own()))],
        0,
        (0, 3),
    ),
    # variance sets of channels c and c + 3 (not contiguous groups)
    "channels-strided-sets": ((N, C, S), (1, 1), [((Own(),), (Pooled((2, 3), (0,)),))], 0, (0, 0)),
    # contiguous channel groups written with a third dim
    "channels-groups-3d": ((N, C, S), (1, 1), [((Own(),), (Pooled((2, 3, 1), (1,)),))], 0, (0, 0)),
    # a layer norm per example over row units of two examples
    "rows-two-examples-layer": ((1, 2 * C, S), (2, 1), [((Own(),), (Pooled((2, C), (1,)),))], 0, (0, 0)),
    # two stages, the first with its units' own mean
    "two-stages-own-mean": (
        (1, N * C, S),
        (N, 1),
        [
            ((Own(),), (Pooled((N, 2, 3), (2,)),)),
            ((Pooled((2, 2, C), (0,)),), (Pooled((2, 2, C), (0,)),)),
        ],
        0,
        (0, 0),
    ),
    # two stages, the last one's mean and variance mixed (the ghost part pooled alike in both)
    "two-stages-mixture": (
        (1, N * C, S),
        (N, 1),
        [
            ((Pooled((N, 2, 3), (2,)),), (Pooled((N, 2, 3), (2,)),)),
            ((Own(), Pooled((2, 2, C), (0,))), (Own(), Pooled((2, 2, C), (0,)))),
        ],
        0,
        (2, 2),
    ),
    # two stages, the first's mean pooled over sets no variance part pools, the last's variance mixed
    "two-stages-pooled-mean-own-var": (
        (1, N * C, S),
        (N, 1),
        [
            ((Pooled((N, 2, 3), (2,)),), (Own(),)),
            ((Pooled((2, 2, C), (0,)),), (Own(), Pooled((2, 2, C), (0,)))),
        ],
        0,
        (0, 2),
    ),
}


def _inputs(name, affine, seed=0, dtype=F64):
    shape, layout, stages, n_consts, (n_mean, n_var) = PLANS[name]
    g = torch.Generator().manual_seed(seed)
    K = shape[1]
    # unit offsets and spreads, so that own, set and batch statistics all differ
    x = torch.randn(shape, generator=g, dtype=F64) * (torch.rand(K, generator=g, dtype=F64) + 0.5).view(1, K, 1)
    x = x + torch.randn(K, generator=g, dtype=F64).view(1, K, 1)
    n_channels = K // (layout[0] * layout[1])
    w = torch.rand(n_channels, generator=g, dtype=F64) + 0.5 if affine else None
    b = torch.randn(n_channels, generator=g, dtype=F64) if affine else None
    consts = tuple(torch.rand(K, generator=g, dtype=F64) + 0.5 for _ in range(n_consts))
    ml = torch.randn(n_mean, generator=g, dtype=F64) if n_mean else None
    vl = torch.randn(n_var, generator=g, dtype=F64) if n_var else None
    gy = torch.randn(shape, generator=g, dtype=F64)
    cast = [None if t is None else t.to(dtype) for t in (x, w, b, ml, vl)]
    return layout, stages, tuple(c.to(dtype) for c in consts), cast, gy


def _check_against_reference(layout, stages, consts, leaves, gy, rtol=1e-10, atol=1e-10):
    """The node's output and the gradients of every leaf (x, weight, bias, logits) against the reference's."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    x, w, b, ml, vl = leaves
    y = pooled_set_norm(x, w, b, layout, stages, EPS, consts, mean_logits=ml, var_logits=vl).y
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    ref = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], layout, stages, EPS, consts, *ref_leaves[3:])
    torch.testing.assert_close(y.double(), ref.detach(), rtol=rtol, atol=atol)
    present = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(y, [leaves[i] for i in present], gy.to(y.dtype))
    ref_grads = torch.autograd.grad(ref, [ref_leaves[i] for i in present], gy)
    for i, got, want in zip(present, grads, ref_grads):
        assert got.dtype == leaves[i].dtype
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m, i=i: f"leaf {i}: {m}")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_gradients_match_the_reference(name, affine):
    """Every leaf's gradient under a random upstream gradient equals autograd through the float64 reference."""
    layout, stages, consts, leaves, gy = _inputs(name, affine)
    _check_against_reference(layout, stages, consts, leaves, gy)


@pytest.mark.parametrize("name", ["rows-joint-with-constants", "two-stages-mixture", "channels-strided-sets"])
def test_float32_gradients_match_the_reference(name):
    """float32 input, affine, constants and logits: float32 gradients within float32 rounding of the reference."""
    layout, stages, consts, leaves, gy = _inputs(name, True, seed=1, dtype=torch.float32)
    _check_against_reference(layout, stages, consts, leaves, gy, rtol=1e-4, atol=1e-4)


def test_gradcheck_of_a_mixed_last_stage_after_a_group_stage():
    torch.manual_seed(3)
    layout, stages, consts, leaves, _ = _inputs("two-stages-mixture", True, seed=3)
    leaves = [t.requires_grad_() for t in leaves]

    def fn(x, w, b, ml, vl):
        return pooled_set_norm(x, w, b, layout, stages, EPS, consts, mean_logits=ml, var_logits=vl).y

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, fast_mode=True)


def test_buffers_follow_the_input_device_not_the_default_device():
    """Under another default device (here ``meta``) the node runs on the input's device: its output and
    statistics are there and equal to those computed without the default device set."""
    plan = [((Pooled((3, 2), (1,)),), (Pooled((3, 2), (1,)),))]
    x = torch.randn(N, C, S, dtype=F64) * 2 + 1
    w = torch.rand(C, dtype=F64, requires_grad=True)
    expected = pooled_set_norm(x, w, None, (1, 1), plan, EPS)
    with torch.device("meta"):
        out = pooled_set_norm(x, w, None, (1, 1), plan, EPS)
    assert out.y.device == out.unit_mean.device == x.device
    torch.testing.assert_close(out.y, expected.y)
    torch.testing.assert_close(out.set_statistics[0].variances[0], expected.set_statistics[0].variances[0])


def test_parts_pooled_alike_in_both_mixtures_average_their_cotangents_once():
    """A stage whose mean and variance mixtures hold the same pooled part (here with constants, which SN's own
    formulas do not cover): its backward averages both cotangents over the part's sets in one op, one ``mean``
    per such part and none for the constants."""
    layout, stages, consts, leaves, gy = _inputs("rows-joint-with-constants", True)
    x, w, b, ml, vl = [t.requires_grad_() for t in leaves]
    y = pooled_set_norm(x, w, b, layout, stages, EPS, consts, mean_logits=ml, var_logits=vl).y
    with ComputeOpCounter() as counter:
        y.backward(gy)
    assert counter.ops["mean"] == 1


def test_switchable_statistics_without_affine_reduce_nothing_to_channels():
    """SN's stage (own, layer and batch parts in both mixtures) without an affine: the backward forms no
    per-channel reduction (no ``sum``) and the input and logit gradients are the reference's."""
    layer, batch = Pooled((N, C), (1,)), Pooled((N, C), (0,))
    stages = [((Own(), layer, batch), (Own(), layer, batch))]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, N * C, S, generator=g, dtype=F64) * 2 + 1
    ml, vl = torch.randn(3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    gy = torch.randn(1, N * C, S, generator=g, dtype=F64)
    _check_against_reference((N, 1), stages, (), [x, None, None, ml, vl], gy)
    x, ml, vl = (t.requires_grad_() for t in (x, ml, vl))
    y = pooled_set_norm(x, None, None, (N, 1), stages, EPS, mean_logits=ml, var_logits=vl).y
    with ComputeOpCounter() as counter:
        y.backward(gy)
    assert counter.ops["sum"] == 0


def _pool_by_definition(x3):
    """A ``pool`` for :func:`stage_statistics` over row units ``(N, C, 1)``: the set's mean and biased variance
    of the values of ``x3 (N, C, S)`` themselves."""

    def pool(part):
        dims = tuple(part.dims) + (2,)
        return x3.mean(dims, keepdim=True), x3.var(dims, correction=0, keepdim=True)

    return pool


def test_stage_statistics_mix_the_parts_with_their_weights():
    """``mu = sum_j wm_j M_j`` and ``var = sum_j wv_j V_j`` with each weight on its own part (all weights
    differ), the pooled parts' statistics reported in part order."""
    g = torch.Generator().manual_seed(6)
    x3 = torch.randn(N, C, S, generator=g, dtype=F64) * 2 + torch.randn(N, C, 1, generator=g, dtype=F64)
    m, v = x3.mean(2, keepdim=True), x3.var(2, correction=0, keepdim=True)
    layer, batch = Pooled((N, C), (1,)), Pooled((N, C), (0,))
    wm, wv = torch.tensor([0.5, 0.3, 0.2], dtype=F64), torch.tensor([0.1, 0.6, 0.3], dtype=F64)
    stage = Stage((Own(), layer, batch), (Own(), layer, batch))
    mu, var, stats = stage_statistics(m, v, stage, wm, wv, _pool_by_definition(x3))
    ln_m, ln_v = x3.mean((1, 2), keepdim=True), x3.var((1, 2), correction=0, keepdim=True)
    bn_m, bn_v = x3.mean((0, 2), keepdim=True), x3.var((0, 2), correction=0, keepdim=True)
    torch.testing.assert_close(mu, 0.5 * m + 0.3 * ln_m + 0.2 * bn_m)
    torch.testing.assert_close(var, 0.1 * v + 0.6 * ln_v + 0.3 * bn_v)
    for got, want in zip((*stats.means, *stats.variances), (ln_m, bn_m, ln_v, bn_v)):
        torch.testing.assert_close(got, want)


def test_stage_statistics_of_single_parts_without_weights():
    """Without weights, a single part is the statistic itself: the set's (pooled) mean and the units' own
    variance."""
    g = torch.Generator().manual_seed(7)
    x3 = torch.randn(N, C, S, generator=g, dtype=F64) + torch.randn(N, C, 1, generator=g, dtype=F64)
    m, v = x3.mean(2, keepdim=True), x3.var(2, correction=0, keepdim=True)
    stage = Stage((Pooled((N, C), (0,)),), (Own(),))
    mu, var, stats = stage_statistics(m, v, stage, None, None, _pool_by_definition(x3))
    torch.testing.assert_close(mu, x3.mean((0, 2), keepdim=True))
    torch.testing.assert_close(var, v)
    assert len(stats.means) == 1 and stats.variances == ()


def test_stage_statistics_refuse_constant_parts():
    stage = Stage((Own(),), (Const(0),))
    m = v = torch.zeros(N, C, 1, dtype=F64)
    with pytest.raises(
        ValueError, match=r"^stage_statistics computes training statistics; a Const part is inference-only$"
    ):
        stage_statistics(m, v, stage, None, None, _pool_by_definition(torch.zeros(N, C, S, dtype=F64)))


def test_channel_group_part_is_the_units_own_for_one_channel_groups():
    """Groups of one channel are the channel units themselves (their own statistics); else sets of ``C/G``
    contiguous channels."""
    assert channel_group_part(C, C) == Own()
    assert channel_group_part(C, 2) == Pooled((2, 3), (1,))
    assert channel_group_part(C, 1) == Pooled((1, C), (1,))


@pytest.mark.parametrize("a", [2**-7, 5 * 2**-7])
def test_float32_units_of_one_value_near_their_set_mean_far_from_zero(a):
    """Two units of one value each, ``2^16 + a`` and ``2^16 - a`` (the set mean ``2^16`` and ``m - M = +-a`` exact
    in float32, ``m + M`` not), one set for mean and variance (hn's ``en:1``): the float32 input gradient is the
    float64 reference's to float32 rounding (the variance's path through the units' means is ``2 (m - M)``)."""
    one = Pooled((1, 2), (1,))
    stages = [((one,), (one,))]
    x = torch.tensor([2.0**16 + a, 2.0**16 - a]).view(1, 2, 1)
    w = torch.tensor([1.5, 0.75])
    gy = torch.tensor([0.3, -1.1], dtype=F64).view(1, 2, 1)
    _check_against_reference((1, 1), stages, (), [x, w, None, None, None], gy, rtol=1e-5, atol=1e-6)


def _random_parameters(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if p.shape == (4,) else 0.0))


def _layer_and_reference_gradients(layer, ref_fn, x, gy):
    """The layer's gradients (input, then parameters in order) under ``gy``, and the reference's from float64
    copies of the input and parameters."""
    params = list(layer.parameters())
    x = x.detach().requires_grad_()
    grads = torch.autograd.grad(layer(x), [x, *params], gy.to(x.dtype))
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref_grads = torch.autograd.grad(ref_fn(*leaves), leaves, gy.double())
    return grads, ref_grads


def test_seqnorm_layer_gradients_channels_last_float32(monkeypatch):
    """SeqNorm with two channel groups and two ghost batches (the fused two-stage node at any size), float32
    ``channels_last`` input: GN without affine, then BN over ghost batch ``j`` = examples ``n = j (mod 2)``, then
    the affine; every gradient (under a ``channels_last`` upstream gradient) within float32 rounding of the float64
    reference."""
    monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0)
    layer = SequentialNorm(4, channel_groups=2, batch_groups=2)
    _random_parameters(layer, 8)
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 4, 3, 3, generator=g) * 2 + 1).to(memory_format=torch.channels_last)
    gy = torch.randn(4, 4, 3, 3, generator=g, dtype=F64).to(memory_format=torch.channels_last)

    def ref_fn(x, w, b):
        return affine(ghost_train(gn_ref(x, 2), 2)[0], w, b)

    grads, ref_grads = _layer_and_reference_gradients(layer, ref_fn, x, gy)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_affine", [True, False])
def test_switchable_norm_layer_gradients(with_affine):
    """SN in training (IN, LN and BN mixed in mean and variance) with and without affine: the gradients of the
    input, the affine and both logits are those of the official formulas (``sn_train``), float64."""
    layer = SwitchableNorm(4, affine=with_affine, dtype=F64)
    _random_parameters(layer, 10)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 2, 3, generator=g, dtype=F64) * 2 + torch.randn(3, 4, 1, 1, generator=g, dtype=F64)
    gy = torch.randn(3, 4, 2, 3, generator=g, dtype=F64)

    def ref_fn(x, *ps):
        y = sn_train(x, ps[-2], ps[-1])[0]
        return affine(y, ps[0], ps[1]) if with_affine else y

    grads, ref_grads = _layer_and_reference_gradients(layer, ref_fn, x, gy)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_heterologous_norm_layer_gradients_of_several_std_sets_channels_last_float32():
    """HN with the IN mean and the variance mixed from IN, GN of two groups and BN, float32 ``channels_last``:
    the gradients of the input, the affine and the std logits within float32 rounding of the reference."""
    layer = HeterologousNorm(4, mean="in", std="in+gn:2+bn")
    _random_parameters(layer, 12)
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(3, 4, 2, 3, generator=g) * 2 + 1).to(memory_format=torch.channels_last)
    gy = torch.randn(3, 4, 2, 3, generator=g, dtype=F64)

    def ref_fn(x, w, b, logits):
        x3 = x.reshape(3, 4, -1)
        xg = x.reshape(3, 2, -1)
        variances = [
            bvar(x3, (2,)),
            bvar(xg, (2,)).repeat_interleave(2, 1),
            bvar(x3, (0, 2)).expand(3, 4, 1),
        ]
        weights = torch.softmax(logits, 0)
        var = sum(weights[k] * v for k, v in enumerate(variances))
        y = (x3 - x3.mean(2, keepdim=True)) / torch.sqrt(var + EPS)
        return affine(y.reshape(x.shape), w, b)

    grads, ref_grads = _layer_and_reference_gradients(layer, ref_fn, x, gy)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
