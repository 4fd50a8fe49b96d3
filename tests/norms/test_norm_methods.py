"""Each method against an independent reference (tests/norms/norm_reference.py): forward, input
gradient, running statistics and evaluation after several training steps."""

from __future__ import annotations

import importlib

import norm_reference as R
import pytest
import torch

from normlightning.norms import (
    BatchGroupNorm,
    BatchNorm,
    BatchRenorm,
    FlatGroupNorm,
    GeneralBatchGroupNorm,
    GhostNorm,
    GroupNorm,
    HeterologousNorm,
    InstanceNorm,
    LayerNorm,
    PositionalNorm,
    SequentialNorm,
    SwitchableNorm,
)

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

D64 = torch.float64


def _randomize_affine(layer):
    torch.manual_seed(123)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand_like(layer.weight) + 0.5)
            layer.bias.copy_(torch.randn_like(layer.bias))
    return layer


def _compare(layer, ref_fn, x, atol=1e-9):
    """Output and input gradient of ``layer(x)`` vs ``ref_fn(x)`` (float64)."""
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    y = layer(xa)
    yr = ref_fn(xb)
    torch.testing.assert_close(y, yr, atol=atol, rtol=1e-7)
    g = torch.randn_like(y)
    (ga,) = torch.autograd.grad(y, xa, g)
    (gb,) = torch.autograd.grad(yr, xb, g)
    torch.testing.assert_close(ga, gb, atol=1e-8, rtol=1e-6)


SHAPES = [(6, 4), (6, 4, 5), (4, 4, 3, 3), (4, 4, 2, 2, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_bn_train_eval(shape):
    torch.manual_seed(0)
    layer = _randomize_affine(BatchNorm(4, dtype=D64))
    run = R.RunningRef((4,))
    for step in range(3):
        x = torch.randn(shape, dtype=D64) * 2 + step
        _compare(layer, lambda t: R.affine(R.bn_train(t)[0], layer.weight, layer.bias), x)
        _, m, v = R.bn_train(x)
        run.update(m, v, x[:, 0].numel())
    torch.testing.assert_close(layer.running_mean, run.mean)
    torch.testing.assert_close(layer.running_var, run.var)
    assert int(layer.num_batches_tracked) == 3
    layer.eval()
    x = torch.randn(shape, dtype=D64)
    _compare(layer, lambda t: R.affine(R.bn_eval(t, run.mean, run.var), layer.weight, layer.bias), x)


def test_bn_matches_torch_batchnorm_with_cumulative_momentum():
    torch.manual_seed(1)
    ours, ref = BatchNorm(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    for _ in range(4):
        x = torch.randn(5, 3, 4, 4) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_bn_example_weighing(alpha):
    torch.manual_seed(2)
    layer = _randomize_affine(BatchNorm(4, dtype=D64))
    for _ in range(3):
        layer(torch.randn(8, 4, 3, 3, dtype=D64) + 2)
    layer.eval()
    layer.alpha = alpha
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()

    def ref(t):
        y = R.example_weighted(t.reshape(3, 4, -1), rm, rv + rm**2, alpha).reshape(t.shape)
        return R.affine(y, layer.weight, layer.bias)

    _compare(layer, ref, torch.randn(3, 4, 3, 3, dtype=D64))
    # alpha has no effect in training
    layer.train()
    x = torch.randn(6, 4, 3, 3, dtype=D64)
    torch.testing.assert_close(layer(x), R.affine(R.bn_train(x)[0], layer.weight, layer.bias))


@pytest.mark.parametrize("N,G", [(8, 2), (8, 4), (10, 4), (5, 2)])
def test_ghost_train_eval(N, G):
    torch.manual_seed(3)
    layer = _randomize_affine(GhostNorm(3, num_groups=G, dtype=D64))
    for step in range(3):
        x = torch.randn(N, 3, 2, 3, dtype=D64) + step
        _compare(layer, lambda t: R.affine(R.ghost_train(t, G)[0], layer.weight, layer.bias), x)
    # running stats: mean of the ghost means / mean of the ghost unbiased variances
    layer2 = GhostNorm(3, num_groups=G, dtype=D64)
    mean = torch.zeros(3, dtype=D64)
    var = torch.ones(3, dtype=D64)
    torch.manual_seed(3)
    for step in range(3):
        x = torch.randn(N, 3, 2, 3, dtype=D64) + step
        layer2(x)
        _, means, uvars = R.ghost_train(x, G)
        mean = 0.9 * mean + 0.1 * means.mean(0)
        var = 0.9 * var + 0.1 * uvars.mean(0)
    torch.testing.assert_close(layer2.running_mean, mean)
    torch.testing.assert_close(layer2.running_var, var)
    layer2.eval()
    x = torch.randn(3, 3, 2, 3, dtype=D64)
    torch.testing.assert_close(layer2(x), R.bn_eval(x, mean, var) * 1.0)


def test_ghost_batch_size_argument():
    torch.manual_seed(4)
    layer = GhostNorm(2, ghost_batch_size=4, affine=False, dtype=D64)
    x = torch.randn(12, 2, 3, dtype=D64)
    assert layer.num_ghosts(12) == 3 and layer.num_ghosts(10) == 3 and layer.num_ghosts(3) == 1
    torch.testing.assert_close(layer(x), R.ghost_train(x, 3)[0])


@pytest.mark.parametrize("G", [1, 2, 4])
def test_gn(G):
    torch.manual_seed(5)
    layer = _randomize_affine(GroupNorm(4, num_groups=G, dtype=D64))
    for mode in (True, False):
        layer.train(mode)
        _compare(
            layer, lambda t: R.affine(R.gn_ref(t, G), layer.weight, layer.bias), torch.randn(3, 4, 2, 3, dtype=D64)
        )


@pytest.mark.parametrize("G", [2, 4, 8, 24])
def test_gnflat(G):
    """gnflat: per (n, g) over the g-th of G contiguous slices of the flattened C*H*W (4*2*6 = 48 values): G = 2
    is GN's channel pairs, G = 4 one channel (IN's set), G = 8 and 24 bands of one channel's rows (patches)."""
    torch.manual_seed(5)
    layer = _randomize_affine(FlatGroupNorm(4, num_groups=G, dtype=D64))
    x = torch.randn(3, 4, 2, 6, dtype=D64)

    def formula(t):
        flat = t.reshape(3, G, -1)
        mu = flat.mean(-1, keepdim=True)
        var = ((flat - mu) ** 2).mean(-1, keepdim=True)
        y = ((flat - mu) / torch.sqrt(var + R.EPS)).reshape(t.shape)
        return y * layer.weight.view(1, 4, 1, 1) + layer.bias.view(1, 4, 1, 1)

    for mode in (True, False):
        layer.train(mode)
        _compare(layer, formula, x)
    if G == 8:  # set of (n, c=1, row 0): the values x[n, 1, 0, :] only
        y = (layer(x) - layer.bias.view(1, 4, 1, 1)) / layer.weight.view(1, 4, 1, 1)
        row = x[:, 1, 0, :]
        expected = (row - row.mean(-1, keepdim=True)) / torch.sqrt(row.var(-1, unbiased=False, keepdim=True) + R.EPS)
        torch.testing.assert_close(y[:, 1, 0, :], expected)
    with pytest.raises(ValueError, match="num_groups=5 must divide D"):
        FlatGroupNorm(4, num_groups=5)(x)
    with pytest.raises(ValueError, match="num_groups"):
        FlatGroupNorm(4, num_groups=0)


def test_ln_in_pn():
    torch.manual_seed(6)
    x = torch.randn(3, 4, 5, 2, dtype=D64)
    ln = _randomize_affine(LayerNorm(4, dtype=D64))
    inn = _randomize_affine(InstanceNorm(4, dtype=D64))
    pn = _randomize_affine(PositionalNorm(4, dtype=D64))
    for mode in (True, False):
        for layer in (ln, inn, pn):
            layer.train(mode)
        _compare(ln, lambda t: R.affine(R.normalize(t, (1, 2, 3)), ln.weight, ln.bias), x)
        _compare(inn, lambda t: R.affine(R.normalize(t, (2, 3)), inn.weight, inn.bias), x)
        _compare(pn, lambda t: R.affine(R.pn_ref(t), pn.weight, pn.bias), x)
    x2 = torch.randn(5, 4, dtype=D64)
    pn.train()
    _compare(pn, lambda t: R.affine(R.pn_ref(t), pn.weight, pn.bias), x2)
    _compare(ln, lambda t: R.affine(R.normalize(t, (1,)), ln.weight, ln.bias), x2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "native-kernels"])
def test_seqnorm(fused, monkeypatch):
    monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0 if fused else 1 << 30)
    torch.manual_seed(7)
    layer = _randomize_affine(SequentialNorm(4, channel_groups=2, batch_groups=2, dtype=D64))
    mean, var = torch.zeros(4, dtype=D64), torch.ones(4, dtype=D64)
    for step in range(3):
        x = torch.randn(6, 4, 3, 2, dtype=D64) + step
        _compare(layer, lambda t: R.affine(R.ghost_train(R.gn_ref(t, 2), 2)[0], layer.weight, layer.bias), x)
        _, means, uvars = R.ghost_train(R.gn_ref(x, 2), 2)
        mean, var = 0.9 * mean + 0.1 * means.mean(0), 0.9 * var + 0.1 * uvars.mean(0)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)
    layer.eval()
    _compare(
        layer,
        lambda t: R.affine(R.bn_eval(R.gn_ref(t, 2), mean, var), layer.weight, layer.bias),
        torch.randn(2, 4, 3, 2, dtype=D64),
    )


@pytest.mark.parametrize(
    "shape,G",
    [
        ((4, 4, 3, 3), 1),
        ((4, 4, 3, 3), 2),
        ((4, 4, 3, 3), 4),
        ((3, 8, 5), 4),
        ((4, 4, 3, 3), 6),
        ((4, 4, 3, 3), 9),
        ((4, 4, 3, 3), 12),
        ((4, 4, 3, 3), 36),
        ((5, 6), 3),
        ((3, 4, 6), 8),
    ],
)
def test_bgn(shape, G):
    torch.manual_seed(8)
    C = shape[1]
    layer = _randomize_affine(BatchGroupNorm(C, num_groups=G, dtype=D64))
    run = R.RunningRef((G,))
    for step in range(3):
        x = torch.randn(shape, dtype=D64) * (step + 1)
        _compare(layer, lambda t: R.affine(R.bgn_train(t, G)[0], layer.weight, layer.bias), x)
        _, m, v, n = R.bgn_train(x, G)
        run.update(m, v, n)
    torch.testing.assert_close(layer.running_mean, run.mean)
    torch.testing.assert_close(layer.running_var, run.var)
    layer.eval()
    _compare(
        layer,
        lambda t: R.affine(R.bgn_eval(t, G, run.mean, run.var), layer.weight, layer.bias),
        torch.randn(shape, dtype=D64),
    )


@pytest.mark.parametrize("N,Gc,E", [(8, 2, 4), (8, 4, 2), (6, 1, 6), (7, 2, 3), (4, 4, 1)])
def test_gbgn(N, Gc, E):
    torch.manual_seed(9)
    layer = _randomize_affine(GeneralBatchGroupNorm(4, channel_groups=Gc, examples_per_group=E, dtype=D64))
    m1, m2 = torch.zeros(4, dtype=D64), torch.ones(4, dtype=D64)
    for step in range(3):
        x = torch.randn(N, 4, 3, 2, dtype=D64) + step
        _compare(layer, lambda t: R.affine(R.gbgn_train(t, Gc, E), layer.weight, layer.bias), x)
        m1 = 0.99 * m1 + 0.01 * x.mean(dim=(0, 2, 3))
        m2 = 0.99 * m2 + 0.01 * (x**2).mean(dim=(0, 2, 3))
    torch.testing.assert_close(layer.moving_x, m1)
    torch.testing.assert_close(layer.moving_x2, m2)
    layer.eval()
    Cg = 4 // Gc
    g1 = m1.view(Gc, Cg).mean(1)
    g2 = m2.view(Gc, Cg).mean(1)

    def ref_eval(t, alpha):
        y = R.example_weighted(t.reshape(t.shape[0], Gc, -1), g1, g2, alpha).reshape(t.shape)
        return R.affine(y, layer.weight, layer.bias)

    x = torch.randn(3, 4, 3, 2, dtype=D64)
    _compare(layer, lambda t: ref_eval(t, 0.0), x)
    layer.alpha = 0.25
    _compare(layer, lambda t: ref_eval(t, 0.25), x)


def _hn_sets(t, spec):
    """Reference (mean, var) broadcast to (N|1, C, 1, 1...) for an HN set on (N, C, H, W)."""
    N, C = t.shape[:2]
    name, _, arg = spec.partition(":")
    G = {"bn": C, "in": C, "ln": 1}.get(name) or int(arg)
    tg = t.reshape(N, G, C // G, -1)
    dims = (0, 2, 3) if name in ("bn", "en") else (2, 3)
    m = tg.mean(dim=dims, keepdim=True)
    v = ((tg - m) ** 2).mean(dim=dims, keepdim=True)

    def rep(s):
        return s.expand(s.shape[0], G, C // G, 1).reshape(s.shape[0], C, 1, 1)

    return rep(m), rep(v)


@pytest.mark.parametrize(
    "mean,std",
    [
        ("bn", "en:1"),
        ("bn", "en:2"),
        ("in", "ln"),
        ("gn:2", "bn"),
        ("en:2", "en:1"),
        ("bn", "bn+en:1"),
        ("bn", "bn+in+ln"),
    ],
)
def test_hn_train(mean, std):
    torch.manual_seed(10)
    layer = _randomize_affine(HeterologousNorm(4, mean=mean, std=std, dtype=D64))
    parts = std.split("+")
    if layer.std_weight is not None:
        with torch.no_grad():
            layer.std_weight.copy_(torch.randn(len(parts)))

    def ref(t):
        mu, _ = _hn_sets(t, mean)
        if len(parts) == 1:
            var = _hn_sets(t, std)[1]
        else:
            w = torch.softmax(layer.std_weight, 0)
            var = sum(w[k] * _hn_sets(t, p)[1] for k, p in enumerate(parts))
        return R.affine((t - mu) / torch.sqrt(var + R.EPS), layer.weight, layer.bias)

    _compare(layer, ref, torch.randn(4, 4, 3, 2, dtype=D64) * 2 + 1)


def test_hn_running_stats_and_eval():
    torch.manual_seed(11)
    layer = _randomize_affine(HeterologousNorm(4, mean="bn", std="en:2", dtype=D64))
    rm, rv = torch.zeros(4, dtype=D64), torch.ones(2, dtype=D64)
    for step in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=D64) + step
        layer(x)
        rm = 0.9 * rm + 0.1 * x.mean(dim=(0, 2, 3))
        xg = x.reshape(5, 2, 2, 9)
        n = xg[:, 0].numel()
        rv = 0.9 * rv + 0.1 * R.bvar(xg, (0, 2, 3)).flatten() * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    layer.eval()
    x = torch.randn(2, 4, 3, 3, dtype=D64)
    vc = rv.repeat_interleave(2).view(1, 4, 1, 1)
    _compare(layer, lambda t: R.affine((t - rm.view(1, 4, 1, 1)) / torch.sqrt(vc + R.EPS), layer.weight, layer.bias), x)


def test_hn_mixture_eval_uses_running_and_per_example():
    torch.manual_seed(12)
    layer = HeterologousNorm(4, mean="bn", std="bn+in", affine=False, dtype=D64)
    assert hasattr(layer, "running_var_0") and not hasattr(layer, "running_var_1")
    for _ in range(2):
        layer(torch.randn(4, 4, 3, dtype=D64))
    layer.eval()
    x = torch.randn(2, 4, 3, dtype=D64)
    v_in = R.bvar(x, (2,))
    var = 0.5 * layer.running_var_0.view(1, 4, 1) + 0.5 * v_in
    torch.testing.assert_close(layer(x), (x - layer.running_mean.view(1, 4, 1)) / torch.sqrt(var + R.EPS))


def test_sn_train_eval():
    torch.manual_seed(13)
    layer = _randomize_affine(SwitchableNorm(4, dtype=D64))
    with torch.no_grad():
        layer.mean_weight.copy_(torch.randn(3))
        layer.var_weight.copy_(torch.randn(3))
    run = R.RunningRef((4,))
    for step in range(3):
        x = torch.randn(5, 4, 3, 2, dtype=D64) + step
        _compare(
            layer,
            lambda t: R.affine(R.sn_train(t, layer.mean_weight, layer.var_weight)[0], layer.weight, layer.bias),
            x,
        )
        _, mb, vb = R.sn_train(x, layer.mean_weight, layer.var_weight)
        run.update(mb, vb, x[:, 0].numel())
    torch.testing.assert_close(layer.running_mean, run.mean)
    torch.testing.assert_close(layer.running_var, run.var)
    layer.eval()

    def ref(t):
        t3 = t.reshape(t.shape[0], 4, -1)
        mu_in, var_in = t3.mean(2, keepdim=True), R.bvar(t3, (2,))
        mu_ln = mu_in.mean(1, keepdim=True)
        var_ln = (var_in + mu_in**2).mean(1, keepdim=True) - mu_ln**2
        a, b = torch.softmax(layer.mean_weight, 0), torch.softmax(layer.var_weight, 0)
        mu = a[0] * mu_in + a[1] * mu_ln + a[2] * run.mean.view(1, 4, 1)
        var = b[0] * var_in + b[1] * var_ln + b[2] * run.var.view(1, 4, 1)
        return R.affine(((t3 - mu) / torch.sqrt(var + R.EPS)).reshape(t.shape), layer.weight, layer.bias)

    _compare(layer, ref, torch.randn(2, 4, 3, 2, dtype=D64))


def test_sn_weights_init_equal_and_learnable():
    layer = SwitchableNorm(4)
    assert layer.mean_weight.requires_grad and layer.var_weight.requires_grad
    torch.testing.assert_close(torch.softmax(layer.mean_weight, 0), torch.full((3,), 1 / 3))
    layer(torch.randn(4, 4, 3)).square().sum().backward()
    assert layer.mean_weight.grad is not None and layer.var_weight.grad.abs().sum() > 0


def test_brn_against_formula():
    torch.manual_seed(14)
    layer = _randomize_affine(
        BatchRenorm(
            3,
            r_max=2.0,
            d_max=0.5,
            r_max_start_step=0,
            r_max_end_step=0,
            d_max_start_step=0,
            d_max_end_step=0,
            dtype=D64,
        )
    )
    rm, rv = torch.zeros(3, dtype=D64), torch.ones(3, dtype=D64)
    for _ in range(4):
        x = torch.randn(6, 3, 2, 2, dtype=D64) * 3 + 2

        def ref(t, rm=rm, rv=rv):
            dims = (0, 2, 3)
            mu = t.mean(dim=dims, keepdim=True)
            sig = torch.sqrt(R.bvar(t, dims) + R.EPS)
            sr = torch.sqrt(rv.view(1, 3, 1, 1) + R.EPS)
            r = torch.clamp(sig.detach() / sr, 1 / 2.0, 2.0)
            d = torch.clamp((mu.detach() - rm.view(1, 3, 1, 1)) / sr, -0.5, 0.5)
            return R.affine((t - mu) / sig * r + d, layer.weight, layer.bias)

        _compare(layer, ref, x)
        n = x[:, 0].numel()
        rm = 0.9 * rm + 0.1 * x.mean(dim=(0, 2, 3))
        rv = 0.9 * rv + 0.1 * R.bvar(x, (0, 2, 3)).flatten() * n / (n - 1)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.renorm_step) == 4
    layer.eval()
    _compare(
        layer, lambda t: R.affine(R.bn_eval(t, rm, rv), layer.weight, layer.bias), torch.randn(2, 3, 2, 2, dtype=D64)
    )


def test_brn_ramp_schedule():
    layer = BatchRenorm(
        2, r_max=3.0, d_max=5.0, r_max_start_step=10, r_max_end_step=30, d_max_start_step=10, d_max_end_step=20
    )
    expected = {0: (1.0, 0.0), 10: (1.0, 0.0), 15: (1.5, 2.5), 20: (2.0, 5.0), 30: (3.0, 5.0), 100: (3.0, 5.0)}
    for step, (r, d) in expected.items():
        layer.renorm_step.fill_(step)
        rr, dd = layer.current_limits()
        assert float(rr) == pytest.approx(r) and float(dd) == pytest.approx(d)
    # a ramp whose start and end coincide is a step at that count
    step = BatchRenorm(
        2, r_max=3.0, d_max=5.0, r_max_start_step=3, r_max_end_step=3, d_max_start_step=0, d_max_end_step=0
    )
    for count, (r, d) in {0: (1.0, 5.0), 2: (1.0, 5.0), 3: (3.0, 5.0), 7: (3.0, 5.0)}.items():
        step.renorm_step.fill_(count)
        assert [float(t) for t in step.current_limits()] == [r, d]
    # at step 0 (r_max = 1, d_max = 0) BRN is BN
    layer.renorm_step.zero_()
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(layer(x), R.bn_train(x)[0], atol=1e-5, rtol=1e-5)
    assert int(layer.renorm_step) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: BatchNorm(3, dtype=D64),
        lambda: GhostNorm(3, num_groups=2, dtype=D64),
        lambda: BatchGroupNorm(3, num_groups=4, dtype=D64),
        lambda: GeneralBatchGroupNorm(3, channel_groups=1, examples_per_group=2, dtype=D64),
        lambda: HeterologousNorm(4 - 1, mean="bn", std="bn+en:1", dtype=D64),
        lambda: SwitchableNorm(3, dtype=D64),
        lambda: PositionalNorm(3, dtype=D64),
        lambda: BatchRenorm(3, dtype=D64),  # step 0 of the ramp: r = 1, d = 0 (r, d are stop-gradient)
    ],
    ids=["bn", "ghost", "bgn", "gbgn", "hn", "sn", "pn", "brn"],
)
def test_gradcheck_float64(make):
    torch.manual_seed(15)
    layer = _randomize_affine(make())
    x = torch.randn(4, 3, 2, 2, dtype=D64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p for _, p in layer.named_parameters()]
    buffers = dict(layer.named_buffers())

    def fn(inp, *ps):
        # fresh copies of the buffers each call keep the running statistics fixed
        state = {**dict(zip(names, ps)), **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(layer, state, (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)
