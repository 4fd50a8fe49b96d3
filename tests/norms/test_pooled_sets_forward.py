"""The forward of the pooled-set node (functional/pooled_sets.py) against a float64 reference computed
from the plan's definition on the values themselves (each set's mean and biased variance over all of its
elements, no moments pooled), and against the SN and SeqNorm formulas: the affine of several stages in
every layout and with either half of it missing, the per-unit affine of a mixture, mixtures of the last
of several stages, the units' own variance only where the plan reads it, constants without a node, the
set statistics of every stage, logits in another dtype than the input, and the gradients of y."""

from __future__ import annotations

import importlib

import pytest
import torch

from normlightning.norms import build_norm
from normlightning.norms.functional.pooled_sets import Const, Own, Pooled, Stage, pooled_set_norm

from .norm_reference import RunningRef, ghost_train, gn_ref, sn_train

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

D64 = torch.float64
EPS = 1e-5
N, C, S = 4, 6, 5


def _units(xv):
    """``xv`` as ``(K, n)``: one row of values per unit (dim 1 of ``xv``)."""
    return xv.transpose(0, 1).reshape(xv.shape[1], -1)


def _set_moments(z, part):
    """Per unit ``(K,)``: the mean and biased variance of all values of the units in its set."""
    if isinstance(part, Own):
        mean = z.mean(1)
        return mean, ((z - mean[:, None]) ** 2).mean(1)
    zz = z.reshape(*part.shape, z.shape[1])
    dims = (*part.dims, len(part.shape))
    mean = zz.mean(dims, keepdim=True)
    var = ((zz - mean) ** 2).mean(dims, keepdim=True)
    full = (*part.shape, 1)
    return mean.expand(full).reshape(-1), var.expand(full).reshape(-1)


def reference(xv, weight, bias, layout, stages, eps=EPS, consts=(), mean_logits=None, var_logits=None):
    """``(y, per-stage set statistics)``, written from the definition: stage by stage, ``z <- (z - mu) /
    sqrt(var + eps)`` with ``mu``, ``var`` the softmax-weighted parts of the last stage (a single part as
    is), then ``y = w_c z + b_c`` for unit ``k`` of ``(before, C, after)`` with channel ``c``. The set
    statistics are each pooled mean part's set mean and each pooled variance part's set variance, per unit."""
    z = _units(xv.to(D64))
    K = z.shape[0]
    statistics = []
    for s, (mean_parts, var_parts) in enumerate(stages):
        last = s == len(stages) - 1
        reported = ([], [])
        terms = ([], [])
        for k, parts in enumerate((mean_parts, var_parts)):
            for part in parts:
                if isinstance(part, Const):
                    terms[k].append(consts[part.index].to(D64))
                    continue
                stat = _set_moments(z, part)[k]
                terms[k].append(stat)
                if isinstance(part, Pooled):
                    reported[k].append(stat)
        mixed = []
        for k, logits in enumerate((mean_logits, var_logits)):
            if last and logits is not None:
                w = torch.softmax(logits.to(D64), 0)
                mixed.append(sum(w[j] * t for j, t in enumerate(terms[k])))
            else:
                mixed.append(terms[k][0])
        mu, var = mixed
        z = (z - mu[:, None]) / torch.sqrt(var[:, None] + eps)
        statistics.append(reported)
    before, after = layout
    if weight is not None:
        z = z * weight.to(D64).view(1, -1, 1).expand(before, -1, after).reshape(K, 1)
    if bias is not None:
        z = z + bias.to(D64).view(1, -1, 1).expand(before, -1, after).reshape(K, 1)
    shape = (xv.shape[1], xv.shape[0], *xv.shape[2:])
    return z.reshape(shape).transpose(0, 1), statistics


def _affine(which, dtype=D64):
    w = torch.rand(C, dtype=dtype) + 0.5 if which in ("both", "weight") else None
    b = torch.randn(C, dtype=dtype) if which in ("both", "bias") else None
    return w, b


# name -> (xv shape, affine layout, stages); two stages in each affine layout
TWO_STAGE_PLANS = {
    # channel units: groups of channel pairs over the batch, then each channel's own statistics
    "channels": ((N, C, S), (1, 1), [((Pooled((3, 2), (1,)),), (Pooled((3, 2), (1,)),)), ((Own(),), (Own(),))]),
    # (example, channel) rows of a batch of 2: GN over 3 groups, then per channel over the batch
    "rows": (
        (1, 2 * C, S),
        (2, 1),
        [((Pooled((2, 3, 2), (2,)),), (Pooled((2, 3, 2), (2,)),)), ((Pooled((2, C), (0,)),), (Pooled((2, C), (0,)),))],
    ),
    # two blocks per channel: each block over the batch, then the channel's two blocks together
    "blocks": ((N, 2 * C, 3), (1, 2), [((Own(),), (Own(),)), ((Pooled((C, 2), (1,)),), (Pooled((C, 2), (1,)),))]),
}


@pytest.mark.parametrize("which", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("name", sorted(TWO_STAGE_PLANS))
def test_two_stages_affine_in_every_layout(name, which):
    """Several stages: ``y = w ((x - m) P + m_out) + b`` per channel, with either half of the affine alone."""
    shape, layout, stages = TWO_STAGE_PLANS[name]
    torch.manual_seed(3)
    xv = torch.randn(shape, dtype=D64) * 2 + 1
    w, b = _affine(which)
    out = pooled_set_norm(xv, w, b, layout, stages, EPS)
    y_ref, statistics = reference(xv, w, b, layout, stages)
    torch.testing.assert_close(out.y, y_ref)
    torch.testing.assert_close(out.unit_mean, _units(xv).mean(1))
    torch.testing.assert_close(out.unit_var, _units(xv).var(1, correction=0))


def _sn_stage():
    layer, batch = Pooled((N, C), (1,)), Pooled((N, C), (0,))
    return Stage((Own(), layer, batch), (Own(), layer, batch))


@pytest.mark.parametrize("which", ["both", "weight", "bias", "none"])
def test_sn_mixture_affine_halves(which):
    """SN on (example, channel) rows, its per-unit affine copied with the mixture's parts: either half alone."""
    torch.manual_seed(4)
    x = torch.randn(N, C, S, dtype=D64) * 2 + 1
    w, b = _affine(which)
    ml, vl = torch.randn(3, dtype=D64), torch.randn(3, dtype=D64)
    out = pooled_set_norm(x.reshape(1, N * C, S), w, b, (N, 1), [_sn_stage()], EPS, mean_logits=ml, var_logits=vl)
    y_ref = sn_train(x, ml, vl)[0]
    if w is not None:
        y_ref = y_ref * w.view(1, C, 1)
    if b is not None:
        y_ref = y_ref + b.view(1, C, 1)
    torch.testing.assert_close(out.y.reshape(N, C, S), y_ref)


@pytest.mark.parametrize("grad", [False, True])
def test_grouped_row_mixture_with_affine(grad):
    """A variance mixture of two pooled parts over rows grouped ``(N, 2, C/2)`` (GN and its batch set, of
    one shape that is not ``(N, C)``) with the affine; with and without a node."""
    torch.manual_seed(5)
    xv = torch.randn(1, N * C, S, dtype=D64) * 2 + 1
    w, b = _affine("both")
    vl = torch.randn(2, dtype=D64)
    stages = [((Own(),), (Pooled((N, 2, 3), (2,)), Pooled((N, 2, 3), (0, 2))))]
    if grad:
        w.requires_grad_()
    out = pooled_set_norm(xv, w, b, (N, 1), stages, EPS, var_logits=vl)
    y_ref, statistics = reference(xv, w.detach(), b, (N, 1), stages, var_logits=vl)
    torch.testing.assert_close(out.y.detach(), y_ref)
    for got, want in zip(out.set_statistics[0].variances, statistics[0][1]):
        torch.testing.assert_close(got.expand(N, 2, 3).reshape(-1), want)


def test_mixture_of_the_last_of_two_stages():
    """The mixture weights mix the last stage's parts only: GN, then a mixture of the rows' own and their
    channel's batch statistics (both mixtures weighted)."""
    torch.manual_seed(6)
    xv = torch.randn(1, N * C, S, dtype=D64) * 2 + 1
    w, b = _affine("both")
    ml, vl = torch.randn(2, dtype=D64), torch.randn(2, dtype=D64)
    batch = Pooled((N, C), (0,))
    stages = [((Pooled((N, 2, 3), (2,)),), (Pooled((N, 2, 3), (2,)),)), ((Own(), batch), (Own(), batch))]
    out = pooled_set_norm(xv, w, b, (N, 1), stages, EPS, mean_logits=ml, var_logits=vl)
    y_ref, _ = reference(xv, w, b, (N, 1), stages, mean_logits=ml, var_logits=vl)
    torch.testing.assert_close(out.y, y_ref)


@pytest.mark.parametrize("grad", [False, True])
def test_three_stages_report_each_stage_statistics(grad):
    """Each stage's set statistics are those of its own input (the previous stage's output), with and
    without a node."""
    torch.manual_seed(7)
    xv = (torch.randn(1, N * C, S, dtype=D64) * 2 + 1).requires_grad_(grad)
    stages = [
        ((Pooled((N, 2, 3), (2,)),), (Pooled((N, 2, 3), (2,)),)),
        ((Pooled((2, 2, C), (0,)),), (Pooled((2, 2, C), (0,)),)),
        ((Pooled((1, N, C), (1,)),), (Pooled((1, N, C), (1,)),)),
    ]
    out = pooled_set_norm(xv, None, None, (N, 1), stages, EPS)
    y_ref, statistics = reference(xv.detach(), None, None, (N, 1), stages)
    torch.testing.assert_close(out.y.detach(), y_ref)
    assert len(out.set_statistics) == 3
    for s, (stage, (means, variances)) in enumerate(zip(stages, statistics)):
        shape = stage[0][0].shape
        got = out.set_statistics[s]
        assert len(got.means) == len(got.variances) == 1
        torch.testing.assert_close(got.means[0].expand(shape).reshape(-1), means[0])
        torch.testing.assert_close(got.variances[0].expand(shape).reshape(-1), variances[0])


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(
    "var_part",
    [Pooled((1, C), (1,)), Pooled((1, C, 1), (1,)), Const(0)],
    ids=["one-set", "one-set-size1-dims", "const"],
)
def test_unit_variance_only_where_read(var_part, grad):
    """A single stage whose variance is a constant or the variance of one set of every unit reads no
    unit variances (``unit_var`` is None); a set of fewer units does."""
    torch.manual_seed(8)
    x = (torch.randn(N, C, S, dtype=D64) * 2 + 1).requires_grad_(grad)
    consts = (torch.rand(C, dtype=D64) + 0.5,)
    stages = [((Own(),), (var_part,))]
    out = pooled_set_norm(x, None, None, (1, 1), stages, EPS, consts)
    assert out.unit_var is None
    y_ref, _ = reference(x.detach(), None, None, (1, 1), stages, consts=consts)
    torch.testing.assert_close(out.y.detach(), y_ref)
    if isinstance(var_part, Pooled):  # the variance of every value about the mean of all
        torch.testing.assert_close(out.set_statistics[0].variances[0].flatten(), x.detach().var(correction=0)[None])
    grouped = pooled_set_norm(x, None, None, (1, 1), [((Own(),), (Pooled((3, 2), (1,)),))], EPS)
    torch.testing.assert_close(grouped.unit_var, x.detach().var((0, 2), correction=0))


def test_two_stages_after_a_one_set_stage():
    """A first stage over one set of every unit (the whole input), then per-channel batch statistics:
    the second stage reads the units' variances."""
    torch.manual_seed(9)
    x = torch.randn(N, C, S, dtype=D64) * 2 + 1
    stages = [((Pooled((1, N * C), (1,)),), (Pooled((1, N * C), (1,)),)), ((Pooled((N, C), (0,)),), (Own(),))]
    out = pooled_set_norm(x.reshape(1, N * C, S), None, None, (N, 1), stages, EPS)
    h = (x - x.mean()) / torch.sqrt(x.var(correction=0) + EPS)
    mean_c = h.mean((0, 2), keepdim=True)
    var_row = h.var(2, correction=0, keepdim=True)
    torch.testing.assert_close(out.y.reshape(N, C, S), (h - mean_c) / torch.sqrt(var_row + EPS))
    torch.testing.assert_close(out.unit_var, x.var(2, correction=0).flatten())


def test_constants_without_a_node():
    """Constant mean and variance per unit (running statistics at inference), nothing to differentiate."""
    torch.manual_seed(10)
    x = torch.randn(N, C, S, dtype=D64) * 2 + 1
    w, b = _affine("both")
    rm, rv = torch.randn(C, dtype=D64), torch.rand(C, dtype=D64) + 0.5
    with torch.no_grad():
        out = pooled_set_norm(x, w, b, (1, 1), [((Const(0),), (Const(1),))], EPS, (rm, rv))
    ref = (x - rm.view(1, C, 1)) / torch.sqrt(rv.view(1, C, 1) + EPS) * w.view(1, C, 1) + b.view(1, C, 1)
    torch.testing.assert_close(out.y, ref)
    assert out.unit_var is None


@pytest.mark.parametrize("channels_last", [False, True])
def test_sn_layer_float32_parameters_float64_input(channels_last):
    """SN built in float32 on a float64 input computes in float64 (the logits' softmax too): output, BN
    running statistics (unbiased variance, float32 buffers) and the float32 logits' gradients."""
    torch.manual_seed(11)
    layer = build_norm("sn", C)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.shape[0] == C else 0.0))
    x = torch.randn(N, C, 3, 2, dtype=D64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    assert y.dtype == D64
    params = [p.detach().double().requires_grad_() for p in (layer.mean_weight, layer.var_weight)]
    w, b = (p.detach().double() for p in (layer.weight, layer.bias))
    x_ref = x.detach().clone().requires_grad_()
    y_ref, mu_bn, var_bn = sn_train(x_ref, *params)
    y_ref = y_ref * w.view(1, C, 1, 1) + b.view(1, C, 1, 1)
    torch.testing.assert_close(y, y_ref)
    running = RunningRef((C,), momentum=0.1)
    running.update(mu_bn.detach(), var_bn.detach(), N * 6)
    assert layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, running.mean.float())
    torch.testing.assert_close(layer.running_var, running.var.float())
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for p, ref in zip((layer.mean_weight, layer.var_weight), params):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, ref.grad.float(), rtol=1e-5, atol=1e-6)


def test_seqnorm_layer_is_gn_then_ghost_bn(monkeypatch):
    """SeqNorm's fused path: GN without affine, then BN over ghost batches (example n in batch n mod G)
    with the affine; the running statistics average the ghost batches' (unbiased variances)."""
    monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0)  # the fused path at any size
    torch.manual_seed(12)
    layer = build_norm("seqnorm", C, channel_groups=3, batch_groups=2, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C) + 0.5)
        layer.bias.copy_(torch.randn(C))
    x = (torch.randn(N, C, 3, 2, dtype=D64) * 2 + 1).requires_grad_()
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    h_ref, means, uvars = ghost_train(gn_ref(x_ref, 3), 2)
    y_ref = h_ref * layer.weight.detach().view(1, C, 1, 1) + layer.bias.detach().view(1, C, 1, 1)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(layer.running_mean, 0.1 * means.mean(0).detach())
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * uvars.mean(0).detach())
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("name", ["sn-rows", "grouped-channels", *sorted(TWO_STAGE_PLANS)])
def test_gradients_match_the_reference(name):
    """The node's gradients (input, affine, logits) are those of the float64 reference, one stage and two."""
    if name == "sn-rows":
        shape, layout, stages, n_logits = (1, N * C, S), (N, 1), [_sn_stage()], 3
    elif name == "grouped-channels":
        shape, layout, stages, n_logits = (N, C, S), (1, 1), [((Own(),), (Pooled((3, 2), (1,)),))], 0
    else:
        (shape, layout, stages), n_logits = TWO_STAGE_PLANS[name], 0
    torch.manual_seed(13)
    xv = torch.randn(shape, dtype=D64) * 2 + 1
    w, b = _affine("both")
    ml, vl = (torch.randn(n_logits, dtype=D64), torch.randn(n_logits, dtype=D64)) if n_logits else (None, None)
    leaves = [t.clone().requires_grad_() for t in (xv, w, b, *((ml, vl) if n_logits else ()))]
    refs = [t.clone().requires_grad_() for t in leaves]
    logits = dict(zip(("mean_logits", "var_logits"), leaves[3:]))
    y = pooled_set_norm(leaves[0], leaves[1], leaves[2], layout, stages, EPS, **logits).y
    ref_logits = dict(zip(("mean_logits", "var_logits"), refs[3:]))
    y_ref, _ = reference(refs[0], refs[1], refs[2], layout, stages, **ref_logits)
    g = torch.randn_like(y_ref)
    got = torch.autograd.grad((y * g).sum(), leaves)
    want = torch.autograd.grad((y_ref * g).sum(), refs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("no_grad", [False, True])
def test_no_node_without_anything_to_differentiate(no_grad):
    """With gradients off, or with no input that requires one, the forward is plain tensor code (no autograd
    node): it runs under ``torch.func.vmap`` (inference per sample), which a node without ``setup_context``
    refuses."""
    torch.manual_seed(14)
    xs = torch.randn(3, N, C, S, dtype=D64) * 2 + 1
    w, b = _affine("both")
    w.requires_grad_(no_grad)  # a parameter of a layer in inference under no_grad
    rv = torch.rand(C, dtype=D64) + 0.5
    stages = [((Own(),), (Const(0),))]

    def fn(x):
        return pooled_set_norm(x, w, b, (1, 1), stages, EPS, (rv,)).y

    if no_grad:
        with torch.no_grad():
            ys = torch.func.vmap(fn)(xs)
    else:
        ys = torch.func.vmap(fn)(xs)
    ref = (xs - xs.mean((1, 3), keepdim=True)) / torch.sqrt(rv.view(1, 1, C, 1) + EPS)
    torch.testing.assert_close(ys, ref * w.detach().view(1, 1, C, 1) + b.view(1, 1, C, 1))


class _NoGradientToFirst(torch.autograd.Function):
    """``sum(a) + sum(b)`` whose backward gives ``a`` no gradient (None)."""

    @staticmethod
    def forward(ctx, a, b):
        return a.sum() + b.sum()

    @staticmethod
    def backward(ctx, g):
        return None, g.expand(3)


def test_output_without_gradient_leaves_inputs_without_gradient():
    """Where the loss gives ``y`` no gradient, the node gives its inputs none either (None, not zeros)."""
    torch.manual_seed(15)
    x = (torch.randn(N, C, S, dtype=D64) + 1).requires_grad_()
    w = (torch.rand(C, dtype=D64) + 0.5).requires_grad_()
    other = torch.ones(3, dtype=D64, requires_grad=True)
    y = pooled_set_norm(x, w, None, (1, 1), [((Own(),), (Pooled((3, 2), (1,)),))], EPS).y
    _NoGradientToFirst.apply(y, other).backward()
    assert x.grad is None and w.grad is None
    torch.testing.assert_close(other.grad, torch.ones(3, dtype=D64))
