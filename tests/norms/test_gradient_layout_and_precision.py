"""Issue 20, fixed cases: gradients whatever the memory layout of the upstream gradient, and float32
precision on degenerate sets and on data far from 0 against its spread.

Regressions: PyTorch's CPU batch-norm backward misreads an upstream gradient dense in another
memory format than the input when a dim has size 1, and every layer on a native batch-norm kernel
passed that on (``bn``, ``ghost``, ``brn``, ``seqnorm``, the eval paths, the fused node); the fused
node's ``dx = A g + B x + C`` cancelled in float32 (8% off on a set of one value), the
``E[x^2] - E[x]^2`` variances of ``sn`` and ``gbgn`` lost 1e-3 at mean/std = 100, the native
float32 GN / LN kernels lost up to 1e-2 on small sets far from 0, the native float32 batch-norm kernel's
rounded mean of a ghost set of equal values lost 1e-4 of ``ghost``'s output, and the fused node's gradient
of a pooled variance, which left out its path through the set mean, lost 2.5e-3 on data far from 0.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from norm_reference import ALL_SPECS, EPS, gbgn_train, sn_train

from normlightning.norms import available_norms, build_norm

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

D64 = torch.float64


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- upstream gradient layouts


def test_issue_repro_bn_gradients_equal_the_formula():
    """The issue's repro: an ``(N, C, H, 1)`` input, the output squeezed and transposed before the
    loss (so the upstream gradient is channels-innermost while the input is contiguous)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 10, 1, dtype=D64, requires_grad=True)
    w = torch.randn(4, 10, 8, dtype=D64)
    m = build_norm("bn", 8).double()
    with torch.no_grad():
        m.weight.copy_(torch.rand(8, dtype=D64) + 0.5)
        m.bias.copy_(torch.randn(8, dtype=D64))
    (m(x).squeeze(-1).transpose(1, 2) * w).sum().backward()

    xr = x.detach().clone().requires_grad_()
    gamma, beta = m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()
    mu = xr.mean((0, 2, 3), keepdim=True)
    var = ((xr - mu) ** 2).mean((0, 2, 3), keepdim=True)
    y = (xr - mu) / torch.sqrt(var + EPS) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
    (y.squeeze(-1).transpose(1, 2) * w).sum().backward()

    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(m.weight.grad, gamma.grad)
    torch.testing.assert_close(m.bias.grad, beta.grad)


def _spec(name: str) -> dict:
    return {"num_groups": 2} if name == "bgn" else ALL_SPECS[name]  # bgn: whole-channel groups


def _grads(layer, x, upstream):
    """Input and parameter gradients of ``layer`` at ``x`` for the upstream gradient ``upstream``."""
    layer = copy.deepcopy(layer)
    x = x.detach().requires_grad_()
    layer(x).backward(upstream)
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", available_norms())
@pytest.mark.parametrize(
    "x_order,g_order",
    [((0, 1, 2, 3), (0, 2, 1, 3)), ((0, 1, 2, 3), (3, 0, 2, 1)), ((3, 0, 2, 1), (0, 1, 2, 3))],
    ids=["contiguous-x/channels-inner-g", "contiguous-x/size-1-outer-g", "size-1-outer-x/contiguous-g"],
)
def test_gradients_do_not_depend_on_the_upstream_layout(name, training, x_order, g_order, monkeypatch):
    """An ``(N, C, H, 1)`` input and an upstream gradient dense in another dim order (the pairs the
    native batch-norm backward misread) give the gradients of the same values laid out contiguously."""
    monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0)  # the fused node too
    torch.manual_seed(1)
    layer = build_norm(name, 4, **_spec(name)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
        layer.train()(torch.randn(6, 4, 3, 1, dtype=D64) * 2 + 1)  # running statistics away from their init
    layer.train(training)
    x = torch.randn(6, 4, 3, 1, dtype=D64) * 2 + 1
    g = torch.randn(6, 4, 3, 1, dtype=D64)

    def dense(t, order):
        return t.permute(*order).contiguous().permute(*[order.index(d) for d in range(4)])

    x_l, g_l = dense(x, x_order), dense(g, g_order)
    assert x_l.stride() != g_l.stride()
    expected = _grads(layer, x.contiguous(), g.contiguous())
    for ours, ref in zip(_grads(layer, x_l, g_l), expected):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_upstream_layout_fix_survives_an_inplace_activation():
    """An in-place op on the output still works and gives the formula's gradient: the fix is a hook
    on the kernel's node (an identity autograd Function returning its input would make the output
    a view, and ``relu_`` on it would raise)."""
    torch.manual_seed(2)
    x = torch.randn(4, 8, 10, 1, dtype=D64, requires_grad=True)
    w = torch.randn(4, 10, 8, dtype=D64)
    m = build_norm("bn", 8, affine=False).double()
    (torch.relu_(m(x)).squeeze(-1).transpose(1, 2) * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    mu = xr.mean((0, 2, 3), keepdim=True)
    y = torch.relu((xr - mu) / torch.sqrt(((xr - mu) ** 2).mean((0, 2, 3), keepdim=True) + EPS))
    (y.squeeze(-1).transpose(1, 2) * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


# ---------------------------------------------------------------- float32 precision


def test_hn_eval_set_of_one_value_float32():
    """The issue's case: ``hn(mean="gn:1", std="in")`` in eval on ``(6, 12)``: the std set of each
    ``(n, c)`` is one value (variance 0), ``y = w (x - mean_c x) / sqrt(eps) + b``."""
    torch.manual_seed(3)
    layer = build_norm("hn", 12, mean="gn:1", std="in").eval()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(12) + 0.5)
        layer.bias.copy_(torch.randn(12))
    x = torch.randn(6, 12, requires_grad=True)
    g = torch.randn(6, 12)
    layer(x).backward(g)

    x64 = x.detach().double().requires_grad_()
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    y = (x64 - x64.mean(1, keepdim=True)) / (0.0 + EPS) ** 0.5 * w + b
    y.backward(g.double())
    assert _rel(x.grad, x64.grad) < 1e-4


def _sn_two_pass(x, wm, wv):
    """SN's formula (docs/methods.md, section sn) with each set's variance in two passes over the set."""
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)

    def moments(dims):
        m = x3.mean(dims, keepdim=True)
        return m, ((x3 - m) ** 2).mean(dims, keepdim=True)

    (m_in, v_in), (m_ln, v_ln), (m_bn, v_bn) = moments((2,)), moments((1, 2)), moments((0, 2))
    a, b = torch.softmax(wm, 0), torch.softmax(wv, 0)
    mu = a[0] * m_in + a[1] * m_ln + a[2] * m_bn
    var = b[0] * v_in + b[1] * v_ln + b[2] * v_bn
    return ((x3 - mu) / torch.sqrt(var + EPS)).reshape(x.shape)


@pytest.mark.parametrize("offset", [30.0, 100.0])
def test_sn_float32_gradients_on_offset_data(offset):
    """``sn`` in training on data whose mean is ``offset`` standard deviations: output and input
    gradient within 1e-4 of the float64 formula and within 10x of plain float32 autograd of it
    (main: about 100x worse than plain autograd at 30, 2.4e-4 off at 100)."""
    torch.manual_seed(4)
    x64 = (torch.randn(8, 4, 3, 3, dtype=D64) + offset).float().double().requires_grad_()
    g = torch.randn(8, 4, 3, 3)
    layer = build_norm("sn", 4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.randn(3))
        layer.var_weight.copy_(torch.randn(3))
    wm, wv = layer.mean_weight.detach(), layer.var_weight.detach()
    x = x64.detach().float().requires_grad_()
    y = layer(x)
    y.backward(g)
    ref = _sn_two_pass(x64, wm.double(), wv.double())
    ref.backward(g.double())
    x32 = x64.detach().float().requires_grad_()
    _sn_two_pass(x32, wm, wv).backward(g)
    assert _rel(y.detach(), ref.detach()) < 1e-4
    assert _rel(x.grad, x64.grad) < 1e-4
    assert _rel(x.grad, x64.grad) < 10 * _rel(x32.grad, x64.grad)


@pytest.mark.parametrize("offset,tol", [(100.0, 1e-4), (1000.0, 1e-3)])
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("gbgn", {"channel_groups": 2}),
        ("gbgn", {"channel_groups": 2, "examples_per_group": 2}),
        ("gbgn", {"channel_groups": 2, "examples_per_group": 3}),  # uneven example groups: the moments path
        ("sn", {}),
    ],
    ids=["gbgn-channels", "gbgn-rows", "gbgn-uneven", "sn"],
)
def test_raw_moment_methods_float32_outputs_on_offset_data(name, kwargs, offset, tol):
    """The ``E[x^2] - E[x]^2`` methods at mean/std = 100 and 1000 (main: 3e-4 to 5e-4 at 100,
    0.03 to 0.08 at 1000)."""
    torch.manual_seed(5)
    x64 = (torch.randn(8, 4, 3, 3, dtype=D64) + offset).float().double()
    y = build_norm(name, 4, **kwargs)(x64.float())
    if name == "sn":
        ref = sn_train(x64, torch.ones(3, dtype=D64), torch.ones(3, dtype=D64))[0]
    else:
        ref = gbgn_train(x64, kwargs["channel_groups"], kwargs.get("examples_per_group") or 8)
    assert _rel(y.detach(), ref) < tol


@pytest.mark.parametrize(
    "name,shape,training",
    [
        ("in", (4, 4, 1, 2), False),  # sets of two values
        ("ln", (6, 3), True),
        ("gn", (4, 4, 3), True),
        ("pn", (5, 2, 2, 2), True),
    ],
)
def test_native_per_example_kernels_float32_on_offset_data(name, shape, training):
    """Small per-example sets 100 standard deviations from 0: the native float32 GN / LN kernels
    are fed data shifted by one value of each set (main: outputs off by 1e-3, pn gradients by 1e-2)."""
    torch.manual_seed(6)
    x64 = (torch.randn(shape, dtype=D64) + 100.0).float().double().requires_grad_()
    g = torch.randn(shape)
    layer = build_norm(name, shape[1], **({"num_groups": 2} if name == "gn" else {})).train(training)
    x = x64.detach().float().requires_grad_()
    y = layer(x)
    y.backward(g)
    N, C = shape[0], shape[1]
    x3 = x64.reshape(N, C, -1)
    if name == "pn":
        dims, sets = (1,), x3
    else:
        G = {"in": C, "ln": 1, "gn": 2}[name]
        dims, sets = (2,), x3.reshape(N, G, -1)
    mu = sets.mean(dims, keepdim=True)
    ref = ((sets - mu) / torch.sqrt(((sets - mu) ** 2).mean(dims, keepdim=True) + EPS)).reshape(shape)
    ref.backward(g.double())
    assert _rel(y.detach(), ref.detach()) < 1e-4
    assert _rel(x.grad, x64.grad) < 1e-4


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("bn", {}),
        ("sn", {}),
        ("gbgn", {"channel_groups": 2, "examples_per_group": 4}),
    ],
    ids=["bn", "sn", "gbgn"],
)
def test_synchronized_statistics_float32_on_offset_data(name, kwargs):
    """``sync_statistics=True`` (no process group: the all-reduce path on the local batch) at
    mean/std = 100: statistics in two passes of all-reduces, not ``E[x^2] - E[x]^2`` (main: 1e-3 off)."""
    torch.manual_seed(7)
    x64 = (torch.randn(8, 4, 3, 3, dtype=D64) + 100.0).float().double().requires_grad_()
    g = torch.randn(8, 4, 3, 3)
    layer = build_norm(name, 4, **kwargs)
    layer.sync_statistics = True
    x = x64.detach().float().requires_grad_()
    y = layer(x)
    y.backward(g)
    if name == "bn":
        mu = x64.mean((0, 2, 3), keepdim=True)
        ref = (x64 - mu) / torch.sqrt(((x64 - mu) ** 2).mean((0, 2, 3), keepdim=True) + EPS)
    elif name == "sn":
        ref = _sn_two_pass(x64, torch.ones(3, dtype=D64), torch.ones(3, dtype=D64))
    else:
        ref = gbgn_train(x64, kwargs["channel_groups"], kwargs["examples_per_group"])
    ref.backward(g.double())
    assert _rel(y.detach(), ref.detach()) < 1e-4
    assert _rel(x.grad, x64.grad) < 1e-4


@pytest.mark.parametrize("N,G", [(6, 6), (6, 3), (7, 3)], ids=["one-example-ghosts", "two-example-ghosts", "uneven"])
def test_ghost_float32_on_sets_of_equal_values(N, G):
    """GhostNorm in float32 training on ghost sets whose values are all equal (``x[n, c, :] = v[n mod G, c]``):
    the formula's output is the bias, ``x - mu = 0``. The native kernel's mean of 9 equal values is
    rounded, and the rounding over ``sqrt(eps)`` reached 1e-4 of the output (main: 1.1e-4 to 3.3e-4 here);
    ghost sets of one example are now shifted by their first value, so their mean is exact; sets of several
    examples keep bn's rounding. The running mean still gets each set's mean (the shift added back)."""
    torch.manual_seed(8)
    v = torch.randn(G, 4, 1, 1, dtype=D64) * 3.0 + 10.0
    x64 = v[torch.arange(N) % G].expand(N, 4, 3, 3).float().double().requires_grad_()
    g = torch.randn(N, 4, 3, 3)
    layer = build_norm("ghost", 4, num_groups=G)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(4) + 0.5)
        layer.bias.copy_(torch.randn(4))
    x = x64.detach().float().requires_grad_()
    y = layer(x)
    y.backward(g)

    w, b = layer.weight.detach().double().view(1, -1, 1, 1), layer.bias.detach().double().view(1, -1, 1, 1)
    ref = torch.empty_like(x64)
    set_means = []
    for j in range(G):  # ghost batch j: the examples n = j (mod G)
        xj = x64[j::G]
        mu = xj.mean((0, 2, 3), keepdim=True)
        set_means.append(mu.view(-1))
        ref[j::G] = (xj - mu) / torch.sqrt(((xj - mu) ** 2).mean((0, 2, 3), keepdim=True) + EPS) * w + b
    ref.backward(g.double())
    error = (y.double() - ref).abs().max().item()  # relative to a unit-variance normalization's output
    if N == G:  # ghost sets of one example are shifted: the mean of equal values is exact
        assert error < 1e-6
    else:  # sets of several examples keep the native kernel's rounding, as bn does (docs/methods.md, Precision)
        assert error < 5e-4
    assert _rel(x.grad, x64.grad) < 1e-4
    torch.testing.assert_close(layer.running_mean.double(), 0.1 * torch.stack(set_means).mean(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pooled_variance_gradient_float32_on_offset_data(training):
    """``hn(mean="gn:2", std="gn:3")`` on ``(3, 6)`` data 100 standard deviations from 0 whose std set of
    channels 0 and 1 has a spread of 3e-3 (variance below ``eps``): the fused node's gradient of a pooled
    variance ``V = avg(v + (m - M)^2)`` needs ``dV/dm_k = 2/n (dm_k - avg dm)``; the second term is 0 in exact
    arithmetic but, in float32, is the set mean ``M``'s rounding (main: input gradient 2.5e-3 off, 440x
    plain float32 autograd of the formula; now 5.6e-6, as plain autograd)."""
    torch.manual_seed(9)
    x64 = torch.randn(3, 6, dtype=D64) + 100.0
    x64[:, 1] = x64[:, 0] + 3e-3
    x64 = x64.float().double().requires_grad_()
    g = torch.randn(3, 6)
    layer = build_norm("hn", 6, mean="gn:2", std="gn:3").train(training)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(6) + 0.5)
        layer.bias.copy_(torch.randn(6))
    x = x64.detach().float().requires_grad_()
    layer(x).backward(g)

    def formula(t, w, b):
        mu = t.view(3, 2, 3).mean(2, keepdim=True).expand(3, 2, 3).reshape(3, 6)
        t3 = t.view(3, 3, 2)
        var = ((t3 - t3.mean(2, keepdim=True)) ** 2).mean(2, keepdim=True).expand(3, 3, 2).reshape(3, 6)
        return (t - mu) / torch.sqrt(var + EPS) * w + b

    w, b = layer.weight.detach(), layer.bias.detach()
    formula(x64, w.double(), b.double()).backward(g.double())
    x32 = x64.detach().float().requires_grad_()
    formula(x32, w, b).backward(g)
    assert _rel(x.grad, x64.grad) < 1e-4
    assert _rel(x.grad, x64.grad) < 10 * _rel(x32.grad, x64.grad)


def test_hn_default_float32_on_offset_data():
    """``hn`` (``mean="bn"``, ``std="en:1"``) in training on float32 data 100 standard deviations from 0:
    the variance of the one set of all values is ``avg (x - M)^2`` from ``x`` itself and its gradient keeps
    the path through ``M``; output, input gradient and running statistics against the float64 formula."""
    torch.manual_seed(3)
    x64 = torch.randn(4, 6, 3, 3, dtype=D64) * torch.linspace(0.5, 2.0, 6, dtype=D64).view(1, 6, 1, 1) + 100.0
    x64 = x64.float().double().requires_grad_()
    g = torch.randn(4, 6, 3, 3)
    layer = build_norm("hn", 6).train()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(6) + 0.5)
        layer.bias.copy_(torch.randn(6))
    x = x64.detach().float().requires_grad_()
    y = layer(x)
    y.backward(g)

    def formula(t, w, b):
        mu = t.mean((0, 2, 3), keepdim=True)
        var = ((t - t.mean()) ** 2).mean()
        return (t - mu) / torch.sqrt(var + EPS) * w.view(1, 6, 1, 1) + b.view(1, 6, 1, 1)

    w, b = layer.weight.detach(), layer.bias.detach()
    ref = formula(x64, w.double(), b.double())
    ref.backward(g.double())
    x32 = x64.detach().float().requires_grad_()
    formula(x32, w, b).backward(g)
    assert (y.double() - ref).abs().max().item() < 5e-4
    assert _rel(x.grad, x64.grad) < 1e-4
    assert _rel(x.grad, x64.grad) < 10 * _rel(x32.grad, x64.grad)
    n = x64.numel()
    with torch.no_grad():
        torch.testing.assert_close(layer.running_mean.double(), 0.1 * x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
        unbiased = ((x64 - x64.mean()) ** 2).sum() / (n - 1)
        torch.testing.assert_close(layer.running_var.double(), 0.9 + 0.1 * unbiased.view(1), rtol=1e-5, atol=0)
