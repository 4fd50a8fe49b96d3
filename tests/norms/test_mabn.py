"""MABN against its formulas written out here (float64, several steps: the moving windows of the
forward and backward statistics, the clipped ``r``, the running variance), its warm-up gradient
against autograd of the uncentred formula, and its weight centering through the injection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.injection import inject
from normlightning.norms import MovingAverageBatchNorm, build_norm

D64 = torch.float64


def _reference_steps(xs, upstreams, gamma, beta, *, m, warmup, renorm_start, r_max, momentum, eps):
    """Per step: ``(y, dL/dx, dL/dgamma, dL/dbeta, running_var, r was clipped)`` of MABN as
    docs/methods.md states it."""
    dims = (0, *range(2, xs[0].dim()))
    view = (1, -1, *([1] * (xs[0].dim() - 2)))
    running, x2s, gzs, out = torch.ones_like(gamma), [], [], []
    for t, (x, up) in enumerate(zip(xs, upstreams), start=1):
        x2s.append(x.square().mean(dims))
        warming = t <= m or t < warmup
        var = x2s[-1] if warming else torch.stack(x2s[-m:]).mean(0)
        std = torch.sqrt(var + eps)
        r = std / torch.sqrt(running + eps)
        clipped = t > max(renorm_start, warmup) and bool(((r < 1 / r_max) | (r > r_max)).any())
        r = torch.ones_like(r) if t <= max(renorm_start, warmup) else r.clamp(1 / r_max, r_max)
        running = (1 - momentum) * running + momentum * var
        z = x / std.view(view)
        y = (gamma * r).view(view) * z + beta.view(view)
        g = up * (gamma * r).view(view)
        gzs.append((g * z).mean(dims))
        mean_gz = gzs[-1] if warming else torch.stack(gzs[-m:]).mean(0)
        grad_x = (g - z * mean_gz.view(view)) / std.view(view)
        out.append((y, grad_x, (up * z).sum(dims) * r, up.sum(dims), running.clone(), clipped))
    return out


def test_mabn_follows_its_moving_averages_forward_and_backward() -> None:
    settings = {"m": 2, "warmup": 0, "renorm_start": 2, "r_max": 1.3, "momentum": 0.2, "eps": 1e-3}
    layer = MovingAverageBatchNorm(
        3, buffer_size=2, eps=1e-3, momentum=0.2, warmup_iters=0, renorm_start_step=2, r_max=1.3, dtype=D64
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.normal_(generator=generator)
    scales = [1.0, 3.0, 0.5, 2.0, 1.0, 4.0]  # r leaves [1/1.3, 1.3] on some steps
    xs = [torch.randn(4, 3, 2, 3, dtype=D64, generator=generator) * s + 0.3 for s in scales]
    ups = [torch.randn(4, 3, 2, 3, dtype=D64, generator=generator) for _ in scales]
    expected = _reference_steps(xs, ups, layer.weight.detach().clone(), layer.bias.detach().clone(), **settings)
    assert any(step[-1] for step in expected)  # the clip of r is exercised
    for t, (x, up, (y_ref, gx_ref, gw_ref, gb_ref, running_ref, _)) in enumerate(zip(xs, ups, expected), start=1):
        layer.zero_grad()
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(up)
        torch.testing.assert_close(y, y_ref, msg=f"output at step {t}")
        torch.testing.assert_close(x.grad, gx_ref, msg=f"input gradient at step {t}")
        torch.testing.assert_close(layer.weight.grad, gw_ref, msg=f"gamma gradient at step {t}")
        torch.testing.assert_close(layer.bias.grad, gb_ref, msg=f"beta gradient at step {t}")
        torch.testing.assert_close(layer.running_x2, running_ref, msg=f"running_var at step {t}")
    running = layer.running_x2.clone()
    x = xs[0]
    torch.testing.assert_close(
        layer.eval()(x),
        layer.weight.view(1, -1, 1, 1) * x / torch.sqrt(running.view(1, -1, 1, 1) + 1e-3)
        + layer.bias.view(1, -1, 1, 1),
    )
    assert int(layer.num_batches_tracked) == len(scales)


@pytest.mark.parametrize("affine, input_dtype", [(False, D64), (True, torch.float32)], ids=["no-affine", "f32-input"])
def test_mabn_without_affine_and_with_windows_in_another_dtype(affine, input_dtype) -> None:
    """The formulas without gamma/beta, and a float32 input to a float64 layer (its windows float64: the
    statistics are copied into them, cast), over steps past warm-up and into the clip of ``r``."""
    settings = {"m": 2, "warmup": 0, "renorm_start": 1, "r_max": 1.3, "momentum": 0.2, "eps": 1e-3}
    layer = MovingAverageBatchNorm(
        3,
        buffer_size=2,
        eps=1e-3,
        momentum=0.2,
        affine=affine,
        warmup_iters=0,
        renorm_start_step=1,
        r_max=1.3,
        dtype=D64,
    )
    generator = torch.Generator().manual_seed(0)
    xs = [(torch.randn(4, 3, 5, dtype=D64, generator=generator) * s + 0.3).to(input_dtype) for s in (1, 3, 0.5, 2)]
    ups = [torch.randn(4, 3, 5, dtype=D64, generator=generator).to(input_dtype) for _ in xs]
    gamma, beta = (layer.weight.detach().clone(), layer.bias.detach().clone()) if affine else (None, None)
    expected = _reference_steps(
        [x.double() for x in xs],
        [u.double() for u in ups],
        torch.ones(3, dtype=D64) if gamma is None else gamma,
        torch.zeros(3, dtype=D64) if beta is None else beta,
        **settings,
    )
    tolerance = {} if input_dtype == D64 else {"rtol": 1e-5, "atol": 1e-5}
    for t, (x, up, (y_ref, gx_ref, gw_ref, _, running_ref, _)) in enumerate(zip(xs, ups, expected), start=1):
        layer.zero_grad()
        x = x.clone().requires_grad_(True)
        y = layer(x)
        y.backward(up)
        assert y.dtype == input_dtype and layer.moving_x2.dtype == D64
        torch.testing.assert_close(y.double(), y_ref, msg=f"output at step {t}", **tolerance)
        torch.testing.assert_close(x.grad.double(), gx_ref, msg=f"input gradient at step {t}", **tolerance)
        torch.testing.assert_close(layer.running_x2, running_ref, msg=f"running_x2 at step {t}", **tolerance)
        if affine:
            torch.testing.assert_close(layer.weight.grad, gw_ref, msg=f"gamma gradient at step {t}", **tolerance)
    assert any(step[-1] for step in expected)  # the clip of r is exercised


def test_mabn_warm_up_gradient_is_the_exact_gradient_of_the_uncentred_formula() -> None:
    """While the window is filling, ``var = x2`` of the batch and the backward is autograd's
    gradient of ``gamma x / sqrt(mean_{n,s} x^2 + eps) + beta``."""
    layer = MovingAverageBatchNorm(3, buffer_size=4, eps=1e-3, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(3, 3, 5, dtype=D64, generator=torch.Generator().manual_seed(1)) + 0.5
    up = torch.randn(3, 3, 5, dtype=D64, generator=torch.Generator().manual_seed(2))
    params = [layer.weight, layer.bias]

    def reference(x):
        x2 = x.square().mean(dim=(0, 2), keepdim=True)
        return layer.weight.view(1, -1, 1) * x / torch.sqrt(x2 + 1e-3) + layer.bias.view(1, -1, 1)

    grads = []
    for fn in (layer, reference):
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        grads.append((y.detach(), *torch.autograd.grad((y * up).sum(), [xr, *params])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_mabn_protocol_and_refusals() -> None:
    layer = MovingAverageBatchNorm(2, buffer_size=3, momentum=None, dtype=D64)
    # the windows are training state, not running statistics (recalibration and virtual devices average only these)
    assert layer.running_stat_names == ("running_x2",)
    xs = [torch.randn(2, 2, 3, dtype=D64) * (k + 1) for k in range(3)]
    for x in xs:
        layer(x)
    expected = torch.stack([x.square().mean(dim=(0, 2)) for x in xs]).mean(0)  # momentum=None: cumulative
    torch.testing.assert_close(layer.running_x2, expected)
    clone = MovingAverageBatchNorm(2, buffer_size=3, momentum=None, dtype=D64)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.eval()(xs[0]), layer.eval()(xs[0]))
    layer.reset_running_stats()
    assert torch.equal(layer.moving_x2, torch.zeros(3, 2, dtype=D64)) and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.moving_gz, torch.zeros(3, 2, dtype=D64)) and int(layer.mabn_step) == 0
    assert layer.effective_args() == {
        "num_features": 2,
        "buffer_size": 3,
        "eps": 1e-5,
        "momentum": None,
        "affine": True,
        "warmup_iters": 100,
        "renorm_start_step": 1000,
        "r_max": 5.0,
    }
    with pytest.raises(ValueError, match=r"needs buffer_size.*norm.kwargs: \{buffer_size: 16\}"):
        build_norm("mabn", 4)
    with pytest.raises(ValueError, match="r_max must be a float >= 1"):
        MovingAverageBatchNorm(4, buffer_size=2, r_max=0.5)
    y = layer.train()(xs[0].requires_grad_())
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used in the graph"):
        (gx,) = torch.autograd.grad(y.square().sum(), xs[0], create_graph=True)
        torch.autograd.grad(gx.sum(), xs[0])


def test_mabn_injection_centres_the_convolutions() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    for _ in range(3):  # a trained BatchNorm: its variance and counter must not become MABN's state
        model(torch.randn(2, 3, 5, 5) + 1)
    _, rows = inject(model, method="mabn", kwargs={"buffer_size": 2}, param_norm="weight_centering")
    layer = model[1]
    assert isinstance(layer, MovingAverageBatchNorm) and int(layer.num_batches_tracked) == 3
    assert int(layer.mabn_step) == 0 and torch.equal(layer.running_x2, torch.ones(4))
    h = model[0](torch.randn(2, 3, 5, 5))
    x2 = h.square().mean(dim=(0, 2, 3), keepdim=True)  # the first step normalizes with its own batch
    torch.testing.assert_close(layer(h), h / torch.sqrt(x2 + layer.eps))
    assert [row["new"] for row in rows] == [
        "MovingAverageBatchNorm (mabn)",
        "ParametrizedConv2d + weight_centering",
        "ParametrizedConv2d + weight_centering",
    ]
    raw = model[0].parametrizations.weight.original
    torch.testing.assert_close(model[0].weight, raw - raw.mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(model[0].weight.sum(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)


def test_weight_centering_is_a_norm_section_setting_exclusive_with_the_others() -> None:
    from normlightning.callbacks import NormInjection

    assert NormInjection(method="mabn", kwargs={"buffer_size": 2}, weight_centering=True).rules.param_norm == (
        "weight_centering"
    )
    with pytest.raises(ValueError, match="norm.weight_standardization and norm.weight_centering are exclusive"):
        NormInjection(method="mabn", kwargs={"buffer_size": 2}, weight_standardization=True, weight_centering=True)
