"""CBN: the Taylor compensation against statistics recomputed exactly with the current weights
(first-order agreement), the output and gradients against the formula, and the injection's
refusal of layers without a convolution before them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.injection import get_spec, inject
from normlightning.injection.apply import apply_spec
from normlightning.norms import build_norm
from normlightning.norms.cross_iteration_bn import CrossIterationBatchNorm

D64 = torch.float64


def _stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and ``mean(x^2)`` over ``(N, H, W)``."""
    return h.mean(dim=(0, 2, 3)), h.square().mean(dim=(0, 2, 3))


def _conv_and_layer(window: int = 2):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    layer = CrossIterationBatchNorm(4, window=window, dtype=D64)
    layer.attach_convolution(conv)
    return conv, layer


def test_compensation_agrees_with_exact_recomputation_to_first_order() -> None:
    conv, layer = _conv_and_layer()
    x_old = torch.randn(4, 3, 5, 5, dtype=D64) + 0.5
    layer(conv(x_old.requires_grad_()))
    w_old = conv.weight.detach().clone()
    direction = torch.randn_like(w_old)
    errors, stale = [], []
    for step in (1e-3, 5e-4):
        with torch.no_grad():
            conv.weight.copy_(w_old + step * direction)
            exact_mu, exact_x2 = _stats(conv(x_old))
        ((comp_mu, comp_x2),) = layer.compensated_history()
        torch.testing.assert_close(comp_mu, exact_mu)  # mu is linear in W: exact
        errors.append((comp_x2 - exact_x2).abs().max())
        stale.append((layer.history[0][1] - exact_x2).abs().max())
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=0.05)  # second order: half the step, a quarter
    assert stale[0] / stale[1] == pytest.approx(2.0, rel=0.05)  # the uncompensated statistics: first order
    assert errors[0] < 0.05 * stale[0]


def test_window_statistics_output_and_gradients_follow_the_formula() -> None:
    conv, layer = _conv_and_layer(window=2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0]))
    generator = torch.Generator().manual_seed(1)
    x_old = torch.randn(4, 3, 5, 5, dtype=D64, generator=generator)
    x_new = torch.randn(4, 3, 5, 5, dtype=D64, generator=generator) * 2 + 1
    up = torch.randn(4, 4, 5, 5, dtype=D64, generator=generator)
    layer(conv(x_old.clone().requires_grad_()))
    w_old = conv.weight.detach().clone()
    jac_mu, jac_x2 = torch.autograd.functional.jacobian(
        lambda w: _stats(nn.functional.conv2d(x_old, w, padding=1)), w_old
    )  # (C, *W.shape) each: the exact derivatives of the old statistics
    with torch.no_grad():
        conv.weight.add_(0.01 * torch.randn_like(w_old))
    delta = conv.weight.detach() - w_old
    old_mu, old_x2 = _stats(nn.functional.conv2d(x_old, w_old, padding=1))
    comp_mu = old_mu + (jac_mu * delta).sum(dim=(1, 2, 3, 4))
    comp_x2 = old_x2 + (jac_x2 * delta).sum(dim=(1, 2, 3, 4))

    def reference(x):
        h = conv(x)
        mu, x2 = _stats(h)
        mean = (mu + comp_mu) / 2
        var = (x2 + comp_x2) / 2 - mean.square()
        view = (1, -1, 1, 1)
        normalized = (h - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5)
        return layer.weight.view(view) * normalized + layer.bias.view(view)

    results = []
    for fn in (lambda x: layer(conv(x)), reference):
        x = x_new.clone().requires_grad_(True)
        y = fn(x)
        results.append((y.detach(), *torch.autograd.grad((y * up).sum(), [x, conv.weight, layer.weight])))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected)


def test_burn_in_and_without_a_convolution_it_is_batch_norm() -> None:
    conv, layer = _conv_and_layer(window=3)
    layer.burnin = 2
    native = nn.BatchNorm2d(4).double()
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, dtype=D64, requires_grad=True)
        h = conv(x)
        torch.testing.assert_close(layer(h), native(h))
    assert len(layer.history) == 2  # kept during burn-in, used after it
    torch.testing.assert_close(layer.running_var, native.running_var)
    plain = build_norm("cbn", 4, dtype=D64)
    h = torch.randn(3, 4, 2, 2, dtype=D64)
    torch.testing.assert_close(plain(h), nn.functional.batch_norm(h, None, None, training=True) * 1.0)
    plain.reset_running_stats()
    assert plain.history == [] and int(plain.num_batches_tracked) == 0


@pytest.mark.parametrize("attached", ["no convolution", "window 1", "input without gradient"])
def test_uncompensated_training_steps_give_batch_norms_gradients_and_running_statistics(attached) -> None:
    """Without a compensation to record (no convolution, ``window=1``, an input that needs no gradient)
    the training step is BN: output, input and affine gradients and running statistics as
    ``nn.BatchNorm2d``'s, over two steps (momentum 0.1, then the cumulative average)."""
    conv, layer = _conv_and_layer(window=1 if attached == "window 1" else 2)
    if attached == "no convolution":
        layer = CrossIterationBatchNorm(4, dtype=D64)
    native = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        for norm in (layer, native):
            norm.weight.copy_(torch.linspace(0.5, 2.0, 4))
            norm.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    for momentum in (0.1, None):
        layer.momentum = native.momentum = momentum
        h = conv(torch.randn(3, 3, 5, 5, dtype=D64)).detach() * 3 + 1
        up = torch.randn_like(h)
        results = []
        for norm in (layer, native):
            x = h.clone().requires_grad_(attached != "input without gradient")
            y = norm(x)
            wrt = [norm.weight, norm.bias] + ([x] if x.requires_grad else [])
            results.append((y.detach(), *torch.autograd.grad((y * up).sum(), wrt)))
        for ours, expected in zip(*results):
            torch.testing.assert_close(ours, expected)
        torch.testing.assert_close(layer.running_mean, native.running_mean)
        torch.testing.assert_close(layer.running_var, native.running_var)
    assert layer.history == []


def test_injection_finds_the_convolution_and_refuses_layers_without_one() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 25, 3),
        nn.BatchNorm1d(3),
    )
    example = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"'cbn' needs the convolution .* '5': it is not directly after a convolution"):
        inject(model, method="cbn", example_input=example)
    with pytest.raises(ValueError, match=r"give an example input .* \['1', '5'\]"):
        inject(model, method="cbn")
    _, rows = inject(model, method="cbn", kwargs={"window": 3}, exclude=["5"], example_input=example)
    assert model[1]._convolution is model[0] and "convolution 0" in rows[0]["args"]
    restored = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))  # a checkpoint's spec, replayed
    apply_spec(restored, get_spec(model))
    assert isinstance(restored[1], CrossIterationBatchNorm) and restored[1]._convolution is restored[0]
    with pytest.raises(ValueError, match=r"window must be an int >= 1"):
        build_norm("cbn", 4, window=0)


@pytest.mark.parametrize("method", ["cbn", "mabn"])
def test_eval_is_batch_norm_with_constant_statistics_and_folds(method) -> None:
    """Inference is ``gamma (x - mean) / sqrt(var + eps) + beta`` with constants per channel
    (``mabn``: mean 0): ``fold_norms`` folds the layer into the convolution without changing outputs."""
    from normlightning.injection import fold_norms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    kwargs = {"buffer_size": 2} if method == "mabn" else {}
    inject(model, method=method, kwargs=kwargs, example_input=torch.zeros(1, 3, 5, 5))
    for _ in range(3):
        model(torch.randn(4, 3, 5, 5) * 2 + 1).sum().backward()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    x = torch.randn(2, 3, 5, 5)
    layer = model[1].eval()
    mean, var = layer.inference_channel_statistics()
    view = (1, -1, 1, 1)
    h = model[0](x)
    expected = layer.weight.view(view) * (h - mean.view(view)) / torch.sqrt(var.view(view) + layer.eps)
    torch.testing.assert_close(layer(h), expected + layer.bias.view(view))
    before = model.eval()(x)
    assert fold_norms(model, x) == {"1": "0"}
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
