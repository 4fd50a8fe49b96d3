"""FRN + TLU, EvoNorm-B0 and EvoNorm-S0 against their formulas written out here (float64, outputs
and gradients), and against timm's EvoNorm2dB0 / EvoNorm2dS0 on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch

from normlightning.norms import build_norm
from normlightning.norms.evonorm import EvoNormB0, EvoNormS0
from normlightning.norms.filter_response_norm import FilterResponseNorm

D64 = torch.float64
FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


def _randomize(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Parameters away from their initial values (v, tau, gamma, beta of both signs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5 + 0.3)
    return layer


def _grads(fn, x: torch.Tensor, params: dict[str, torch.Tensor], upstream: torch.Tensor):
    """``fn(x)`` and the gradients of ``sum(fn(x) * upstream)`` with respect to ``x`` and ``params``."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    tensors = [x, *params.values()]
    grads = torch.autograd.grad((y * upstream).sum(), tensors)
    return y.detach(), dict(zip(["x", *params], grads))


def _assert_same(out_a, out_b, **tolerances) -> None:
    (y_a, g_a), (y_b, g_b) = out_a, out_b
    torch.testing.assert_close(y_a, y_b, **tolerances)
    assert g_a.keys() == g_b.keys()
    for key in g_a:
        torch.testing.assert_close(g_a[key], g_b[key], msg=f"gradient of {key}", **tolerances)


def _c(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A per-channel ``(C,)`` tensor broadcast against ``(N, C, *spatial)`` with ``dims`` dims."""
    return t.view(1, -1, *([1] * (dims - 2)))


# ------------------------------------------------------------------ FRN + TLU
def _frn_reference(x, gamma, beta, tau, eps):
    """``max(gamma x / sqrt(mean_s x^2 + eps) + beta, tau)``; ``(N, C)``: ``nu2 = x^2``."""
    nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.square()
    y = _c(gamma, x.dim()) * x / torch.sqrt(nu2 + eps) + _c(beta, x.dim())
    return torch.maximum(y, _c(tau, x.dim()))


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 2)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("learnable_eps", [False, True], ids=["eps", "learned-eps"])
def test_frn_matches_its_formula_and_gradients(shape, learnable_eps) -> None:
    layer = _randomize(FilterResponseNorm(4, eps=1e-3, learnable_eps=learnable_eps, dtype=D64))
    x = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    upstream = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    params = dict(layer.named_parameters())

    def reference(x):
        eps = 1e-3 + params["eps_learned"].abs() if learnable_eps else 1e-3
        return _frn_reference(x, params["weight"], params["bias"], params["tau"], eps)

    _assert_same(_grads(layer, x, params, upstream), _grads(reference, x, params, upstream))
    assert (layer(x) >= _c(params["tau"], len(shape)) - 1e-12).all()  # the TLU floor holds


@pytest.mark.parametrize("affine, tlu", [(True, True), (False, True), (True, False), (False, False)])
def test_frn_gradients_at_tlu_ties_and_without_affine_or_tlu(affine, tlu) -> None:
    """The hand-written backward (one autograd node) against autograd through the formula: where
    ``y = tau`` exactly (``x = 0`` with ``beta = tau``) ``torch.maximum`` splits the gradient in half
    between ``y`` and ``tau``; without the affine or the TLU those gradients are absent."""
    layer = _randomize(FilterResponseNorm(4, eps=1e-3, affine=affine, tlu=tlu, dtype=D64))
    params = dict(layer.named_parameters())
    if affine and tlu:
        with torch.no_grad():
            layer.tau.copy_(layer.bias)
    x = torch.randn(2, 4, 3, 5, dtype=D64, generator=torch.Generator().manual_seed(1))
    x[:, :, 0] = 0.0  # y = beta there: ties with tau
    upstream = torch.randn(x.shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    ones, zeros = torch.ones(4, dtype=D64), torch.zeros(4, dtype=D64)

    def reference(x):
        gamma, beta = (params["weight"], params["bias"]) if affine else (ones, zeros)
        tau = params["tau"] if tlu else torch.full((4,), -torch.inf, dtype=D64)
        return _frn_reference(x, gamma, beta, tau, 1e-3)

    ours, theirs = _grads(layer, x, params, upstream), _grads(reference, x, params, upstream)
    _assert_same(ours, theirs)
    if affine and tlu:  # the ties are there: half of their gradient went to tau
        ties = upstream[:, :, 0].sum(dim=(0, 2))
        above = torch.where(ours[0] > layer.tau.view(1, -1, 1, 1), 0.0, upstream).sum(dim=(0, 2, 3))
        torch.testing.assert_close(ours[1]["tau"], above - ties / 2)


def test_frn_options_and_refusals() -> None:
    plain = FilterResponseNorm(3, tlu=False)
    assert plain.tau is None and plain.eps_learned is None and plain.injection_note is None
    assert plain.effective_args() == {
        "num_features": 3,
        "eps": 1e-6,
        "affine": True,
        "tlu": False,
        "learnable_eps": False,
        "learnable_eps_init": 1e-4,
    }
    learned = FilterResponseNorm(3, learnable_eps=True, learnable_eps_init=2e-4)
    assert float(learned.eps_learned.detach()) == pytest.approx(2e-4) and "activation" in learned.injection_note
    x = torch.randn(2, 3, 4, 4) - 1
    torch.testing.assert_close(
        FilterResponseNorm(3, affine=False, tlu=False)(x), x / torch.sqrt(x.square().mean((2, 3), keepdim=True) + 1e-6)
    )
    with pytest.raises(ValueError, match="tlu must be True or False"):
        FilterResponseNorm(3, tlu="yes")
    with pytest.raises(ValueError, match="learnable_eps_init must be a float >= 0"):
        FilterResponseNorm(3, learnable_eps=True, learnable_eps_init=-1.0)


# ------------------------------------------------------------------ EvoNorm-B0
def _b0_reference(x, v, gamma, beta, var_b, eps):
    """``gamma x / max(sqrt(var_b + eps), v x + sqrt(var_i + eps)) + beta`` (``var_i`` biased over S)."""
    spatial = tuple(range(2, x.dim()))
    var_i = x.var(dim=spatial, unbiased=False, keepdim=True)
    den = torch.maximum(torch.sqrt(_c(var_b, x.dim()) + eps), _c(v, x.dim()) * x + torch.sqrt(var_i + eps))
    return _c(gamma, x.dim()) * x / den + _c(beta, x.dim())


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 3, 2, 4), (2, 3, 2, 2, 3)], ids=lambda s: f"{len(s)}d")
def test_evonorm_b0_matches_its_formula_in_training_and_eval(shape) -> None:
    layer = _randomize(EvoNormB0(3, eps=1e-3, momentum=0.25, dtype=D64))
    params = dict(layer.named_parameters())
    x = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    upstream = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    batch_dims = (0, *range(2, x.dim()))

    def train_reference(x):  # the batch variance is differentiated through
        return _b0_reference(x, params["v"], params["weight"], params["bias"], x.var(batch_dims, unbiased=False), 1e-3)

    _assert_same(_grads(layer.train(), x, params, upstream), _grads(train_reference, x, params, upstream))
    n = x.numel() // 3
    expected_running = 0.75 * 1.0 + 0.25 * x.var(batch_dims, unbiased=False) * n / (n - 1)
    torch.testing.assert_close(layer.running_var, expected_running)
    running = layer.running_var.clone()

    def eval_reference(x):
        return _b0_reference(x, params["v"], params["weight"], params["bias"], running, 1e-3)

    _assert_same(_grads(layer.eval(), x, params, upstream), _grads(eval_reference, x, params, upstream))
    torch.testing.assert_close(layer.running_var, running)  # eval does not update


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_evonorm_b0_gradients_where_the_two_denominators_tie(affine, training) -> None:
    """The hand-written backward against autograd through the formula where ``d1 = d2`` everywhere
    (``torch.maximum`` gives each half of the gradient): ``v = 0`` and maps ``(a_c - 1, a_c + 1)`` in
    every example, whose instance and batch variances are both exactly 1 (the running one too)."""
    layer = _randomize(EvoNormB0(3, eps=1e-3, affine=affine, dtype=D64))
    with torch.no_grad():
        layer.v.zero_()
    params = dict(layer.named_parameters())
    centres = torch.tensor([0.5, 2.0, -3.0], dtype=D64).view(1, 3, 1)
    x = (centres + torch.tensor([-1.0, 1.0], dtype=D64)).expand(4, 3, 2).contiguous()
    upstream = torch.randn(x.shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    ones, zeros = torch.ones(3, dtype=D64), torch.zeros(3, dtype=D64)

    def reference(x):
        var_b = x.var(dim=(0, 2), unbiased=False) if training else torch.ones(3, dtype=D64)
        gamma, beta = (params["weight"], params["bias"]) if affine else (ones, zeros)
        return _b0_reference(x, params["v"], gamma, beta, var_b, 1e-3)

    _assert_same(_grads(layer.train(training), x, params, upstream), _grads(reference, x, params, upstream))


_NON_CONTIGUOUS = {
    "expanded": ((1, 3, 4, 5), lambda t: t.expand(2, 3, 4, 5)),  # overlapping: one example seen twice
    "channel-slice": ((2, 6, 4, 5), lambda t: t[:, ::2]),  # gaps between the channels
    "channels_last": ((2, 3, 4, 5), lambda t: t.contiguous(memory_format=torch.channels_last)),
}


@pytest.mark.parametrize("layout", sorted(_NON_CONTIGUOUS))
def test_evonorm_b0_training_gradients_of_non_contiguous_inputs(layout) -> None:
    """The training node computes on a contiguous copy of ``x``: an expanded, a sliced and a channels_last
    input get the gradients of the formula (autograd through it, on the same view of the same leaf), and
    a channels_last input its own strides on ``dL/dx``."""
    layer = _randomize(EvoNormB0(3, eps=1e-3, dtype=D64))
    params = dict(layer.named_parameters())
    shape, view = _NON_CONTIGUOUS[layout]
    base = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    upstream = torch.randn(2, 3, 4, 5, dtype=D64, generator=torch.Generator().manual_seed(2))

    def reference(x):
        var_b = x.var((0, 2, 3), unbiased=False)
        return _b0_reference(x, params["v"], params["weight"], params["bias"], var_b, 1e-3)

    results = []
    for fn in (layer.train(), reference):
        leaf = base.clone().requires_grad_(True)
        x = view(leaf)
        x_grads = []
        x.register_hook(x_grads.append)
        (fn(x) * upstream).sum().backward()
        results.append([leaf.grad] + [p.grad.clone() for p in params.values()] + x_grads)
        layer.zero_grad()
    for ours, expected in zip(results[0][:4], results[1][:4]):
        torch.testing.assert_close(ours, expected)
    if layout == "channels_last":
        assert results[0][4].stride() == view(base).stride()


def test_evonorm_b0_running_statistics_protocol() -> None:
    """``momentum=None``: cumulative average of the unbiased batch variances; reset and round trip."""
    layer = EvoNormB0(2, momentum=None, dtype=D64)
    xs = [torch.randn(3, 2, 4, dtype=D64) * (k + 1) for k in range(3)]
    for x in xs:
        layer(x)
    expected = torch.stack([x.var(dim=(0, 2), unbiased=True) for x in xs]).mean(0)
    torch.testing.assert_close(layer.running_var, expected)
    assert layer.running_stat_names == ("running_var",) and int(layer.num_batches_tracked) == 3
    clone = EvoNormB0(2, momentum=None, dtype=D64)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.eval()(xs[0]), layer.eval()(xs[0]))
    layer.reset_running_stats()
    assert torch.equal(layer.running_var, torch.ones(2, dtype=D64)) and int(layer.num_batches_tracked) == 0


# ------------------------------------------------------------------ EvoNorm-S0
def _s0_reference(x, v, gamma, beta, groups, eps):
    """``gamma x sigmoid(v x) / sqrt(var_g + eps) + beta`` with ``var_g`` over (C/G, S) of one example."""
    n, c = x.shape[:2]
    var_g = x.reshape(n, groups, -1).var(dim=2, unbiased=False)
    std = torch.sqrt(var_g + eps).repeat_interleave(c // groups, dim=1).view(n, c, *([1] * (x.dim() - 2)))
    return _c(gamma, x.dim()) * x * torch.sigmoid(_c(v, x.dim()) * x) / std + _c(beta, x.dim())


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4, 3, 2), (1, 4, 2, 2, 3)], ids=lambda s: f"{len(s)}d")
def test_evonorm_s0_matches_its_formula(shape) -> None:
    layer = _randomize(EvoNormS0(4, num_groups=2, eps=1e-3, dtype=D64))
    params = dict(layer.named_parameters())
    x = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    upstream = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(2))

    def reference(x):
        return _s0_reference(x, params["v"], params["weight"], params["bias"], 2, 1e-3)

    for training in (True, False):  # no running statistics: the same computation
        _assert_same(_grads(layer.train(training), x, params, upstream), _grads(reference, x, params, upstream))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_evonorm_s0_float32_gradients_with_a_constant_set(affine) -> None:
    """The hand-written backward in float32 against autograd through the formula in float64, with one set
    of equal values far from 0 (its variance and the variance's gradient exactly 0), with and without
    the affine."""
    layer = _randomize(EvoNormS0(4, num_groups=2, eps=1e-3, affine=affine))
    params = dict(layer.named_parameters())
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    x[1, :2] = 3.0  # example 1, group 0: one value
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ones, zeros = torch.ones(4, dtype=D64), torch.zeros(4, dtype=D64)

    def reference(x):
        p64 = {name: p.double() for name, p in params.items()}
        gamma, beta = (p64["weight"], p64["bias"]) if affine else (ones, zeros)
        return _s0_reference(x.double(), p64["v"], gamma, beta, 2, 1e-3)

    def assert_float32_close(ours, theirs, msg):  # float32 rounding at the scale of the largest value
        atol = 1e-6 * float(theirs.abs().max())
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=atol, msg=msg)

    ours, theirs = _grads(layer, x, params, upstream), _grads(reference, x, params, upstream)
    assert_float32_close(ours[0], theirs[0], "output")
    for key in ours[1]:
        assert_float32_close(ours[1][key], theirs[1][key], f"gradient of {key}")


def test_evonorm_refusals_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"num_groups=3 must be a positive divisor .* C=4"):
        EvoNormS0(4, num_groups=3)
    for layer in (EvoNormB0(4), EvoNormS0(4, num_groups=2)):
        with pytest.raises(ValueError, match=r"needs input with spatial dims .* \(N, C\) features"):
            layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="EvoNormB0's instance variance has 1 element"):
        EvoNormB0(4)(torch.randn(3, 4, 1, 1))
    with pytest.raises(ValueError, match="EvoNormS0 has 1 element"):
        EvoNormS0(4, num_groups=4)(torch.randn(3, 4, 1, 1))


@pytest.mark.parametrize("method", ["frn", "evonorm_b0", "evonorm_s0"])
def test_hand_written_backwards_refuse_a_second_derivative(method) -> None:
    """FRN's and the EvoNorms' training nodes have hand-written backwards: a double backward raises,
    never returns a wrong second derivative."""
    layer = build_norm(method, 4, **({"num_groups": 2} if method == "evonorm_s0" else {}))
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # no second-order path to x
        torch.autograd.grad(gx.sum(), x)


# ------------------------------------------------------------------ against timm
def _copy_into(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in source.named_parameters():
            getattr(target, name).copy_(p)
        target.running_var.copy_(source.running_var) if hasattr(target, "running_var") else None
    return target


@pytest.mark.parametrize("method", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_agrees_with_timm_on_the_same_weights(method) -> None:
    """Outputs, input and parameter gradients and the running variance equal timm's in training and
    eval (float64 input, 4-D: timm's layers take 4-D input only). timm computes its variances in
    float32 whatever the input's dtype (``x.float().var(...)``), hence float32 tolerances."""
    layers = pytest.importorskip("timm.layers")
    if method == "evonorm_b0":
        ours = _randomize(EvoNormB0(4, eps=1e-3, momentum=0.2, dtype=D64))
        theirs = layers.EvoNorm2dB0(4, eps=1e-3, momentum=0.2, dtype=D64)
    else:
        ours = _randomize(EvoNormS0(4, num_groups=2, eps=1e-3, dtype=D64))
        theirs = layers.EvoNorm2dS0(4, groups=2, eps=1e-3, dtype=D64)
    _copy_into(ours, theirs)
    x = torch.randn(3, 4, 3, 5, dtype=D64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    upstream = torch.randn(x.shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    for training in (True, False):
        ours.train(training), theirs.train(training)
        out_ours = _grads(ours, x, dict(ours.named_parameters()), upstream)
        out_theirs = _grads(theirs, x, dict(theirs.named_parameters()), upstream)
        _assert_same(out_ours, out_theirs, **FLOAT32)
        if method == "evonorm_b0":
            torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)


def test_registry_names_build_the_layers() -> None:
    assert isinstance(build_norm("frn", 4), FilterResponseNorm)
    assert isinstance(build_norm("evonorm_b0", 4), EvoNormB0)
    assert build_norm("evonorm_s0", 64).num_groups == 32  # the paper's G
    layer = build_norm("evonorm_b0", 4, momentum=0.3)
    assert copy.deepcopy(layer).effective_args() == {
        "num_features": 4,
        "eps": 1e-5,
        "momentum": 0.3,
        "affine": True,
        "virtual_devices": 1,
    }
