"""``moving_average_batch_norm`` called directly against its docstring's formulas written out here in
float64, step by step: which ring slot each step's ``x2_t`` and ``gz_t`` land in, the warm-up boundary
(``t <= m or t < warmup_iters``), the window means, ``r`` clipped on both sides after
``max(renorm_start_step, warmup_iters)``, the ``running_x2`` lerp, the gradients; rings and running
buffers in a dtype other than the input's; inference with ``running_x2`` in another dtype; and
``weight_center`` keeping a low-precision weight's dtype."""

from __future__ import annotations

import pytest
import torch

from normlightning.norms.functional.mabn import moving_average_batch_norm, weight_center

D64 = torch.float64
F32 = torch.float32


def _reference(xs, ups, gamma, beta, *, m, warmup, renorm_start, r_max, factor, eps):
    """Per step ``t``: ``(y, dL/dx, dL/dgamma, dL/dbeta, running_x2, x2_t, gz_t, r)`` in float64, as the
    docstring of ``moving_average_batch_norm`` states them."""
    view = (1, -1, 1)
    running, x2s, gzs, out = torch.ones_like(gamma), [], [], []
    for t, (x, up) in enumerate(zip(xs, ups), start=1):
        x2s.append(x.square().mean(dim=(0, 2)))
        warming = t <= m or t < warmup
        var = x2s[-1] if warming else sum(x2s[-m:]) / m
        std = (var + eps).sqrt()
        r = torch.ones_like(var)
        if t > max(renorm_start, warmup):
            r = (std / (running + eps).sqrt()).clamp(1 / r_max, r_max)
        running = (1 - factor) * running + factor * var
        z = x / std.view(view)
        y = (gamma * r).view(view) * z + beta.view(view)
        g = up * (gamma * r).view(view)
        gzs.append((g * z).mean(dim=(0, 2)))
        mean_gz = gzs[-1] if warming else sum(gzs[-m:]) / m
        grad_x = (g - z * mean_gz.view(view)) / std.view(view)
        out.append((y, grad_x, r * (up * z).sum(dim=(0, 2)), up.sum(dim=(0, 2)), running, x2s[-1], gzs[-1], r))
    return out


@pytest.mark.parametrize(
    "x_dtype, buffer_dtype",
    [(D64, D64), (D64, F32), (F32, D64)],
    ids=["f64", "f64-input-f32-buffers", "f32-input-f64-buffers"],
)
def test_training_steps_follow_the_formulas_slot_by_slot(x_dtype, buffer_dtype) -> None:
    """Window ``m = 3``, warm-up 5 (so step 5 is the first on the window mean, step 4 still on its own
    batch), renorm from step 7; ``x2_t`` and ``gz_t`` sit in row ``(t - 1) mod m`` of their rings."""
    settings = {"m": 3, "warmup": 5, "renorm_start": 6, "r_max": 1.5, "factor": 0.3, "eps": 1e-3}
    C = 3
    generator = torch.Generator().manual_seed(3)
    scales = [1.0, 2.0, 0.7, 3.0, 0.4, 1.0, 4.0, 4.0, 0.1, 0.1, 0.1, 1.0]
    xs = [torch.randn(4, C, 5, dtype=D64, generator=generator) * s for s in scales]
    ups = [torch.randn(4, C, 5, dtype=D64, generator=generator) for _ in scales]
    gamma = torch.tensor([0.5, 1.0, 2.0], dtype=D64)
    beta = torch.tensor([0.1, -0.2, 0.3], dtype=D64)
    # the reference runs on the inputs as the layer sees them (rounded to x_dtype)
    xs = [x.to(x_dtype).to(D64) for x in xs]
    ups = [u.to(x_dtype).to(D64) for u in ups]
    expected = _reference(xs, ups, gamma, beta, **settings)
    rs = torch.stack([step[-1] for step in expected])
    assert (rs == 1 / 1.5).any() and (rs == 1.5).any() and ((rs > 1 / 1.5) & (rs < 1.5)).any()  # both clips

    running_x2 = torch.ones(C, dtype=buffer_dtype)
    moving_x2 = torch.zeros(settings["m"], C, dtype=buffer_dtype)
    moving_gz = torch.zeros(settings["m"], C, dtype=buffer_dtype)
    weight = gamma.to(x_dtype).requires_grad_(True)
    bias = beta.to(x_dtype).requires_grad_(True)
    tolerance = {} if x_dtype == buffer_dtype == D64 else {"rtol": 2e-5, "atol": 2e-5}
    for t, (x, up, (y_ref, gx_ref, gw_ref, gb_ref, running_ref, x2_ref, gz_ref, _)) in enumerate(
        zip(xs, ups, expected), start=1
    ):
        weight.grad = bias.grad = None
        x = x.to(x_dtype).requires_grad_(True)
        y = moving_average_batch_norm(
            x,
            weight,
            bias,
            running_x2,
            moving_x2,
            moving_gz,
            training=True,
            step=t,
            warmup_iters=settings["warmup"],
            renorm_start_step=settings["renorm_start"],
            r_max=settings["r_max"],
            factor=settings["factor"],
            eps=settings["eps"],
        )
        y.backward(up.to(x_dtype))
        assert y.dtype == x_dtype and x.grad.dtype == x_dtype
        assert running_x2.dtype == moving_x2.dtype == moving_gz.dtype == buffer_dtype
        slot = (t - 1) % settings["m"]
        msg = f"at step {t}"
        torch.testing.assert_close(moving_x2[slot].double(), x2_ref, msg=f"x2 slot {msg}", **tolerance)
        torch.testing.assert_close(moving_gz[slot].double(), gz_ref, msg=f"gz slot {msg}", **tolerance)
        torch.testing.assert_close(y.double(), y_ref, msg=f"output {msg}", **tolerance)
        torch.testing.assert_close(x.grad.double(), gx_ref, msg=f"input gradient {msg}", **tolerance)
        torch.testing.assert_close(weight.grad.double(), gw_ref, msg=f"gamma gradient {msg}", **tolerance)
        torch.testing.assert_close(bias.grad.double(), gb_ref, msg=f"beta gradient {msg}", **tolerance)
        torch.testing.assert_close(running_x2.double(), running_ref, msg=f"running_x2 {msg}", **tolerance)


@pytest.mark.parametrize(
    "x_dtype, running_dtype", [(D64, F32), (F32, D64), (D64, D64)], ids=["f64-f32", "f32-f64", "same"]
)
def test_inference_uses_running_x2_in_the_input_dtype(x_dtype, running_dtype) -> None:
    """Inference ``y = gamma x / sqrt(running_x2 + eps) + beta`` with ``running_x2`` kept in another dtype
    than the input (cast for the kernel; the buffer itself is left as it is)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, dtype=D64, generator=generator).to(x_dtype)
    running_x2 = torch.tensor([0.5, 2.0, 4.0], dtype=running_dtype)
    gamma = torch.tensor([0.5, 1.0, 2.0], dtype=x_dtype)
    beta = torch.tensor([0.1, -0.2, 0.3], dtype=x_dtype)
    rings = torch.zeros(2, 3, dtype=running_dtype)
    y = moving_average_batch_norm(
        x,
        gamma,
        beta,
        running_x2,
        rings,
        rings.clone(),
        training=False,
        step=7,
        warmup_iters=0,
        renorm_start_step=0,
        r_max=2.0,
        factor=0.1,
        eps=1e-3,
    )
    expected = gamma.double().view(1, -1, 1) * x.double() / (running_x2.double().view(1, -1, 1) + 1e-3).sqrt()
    expected = expected + beta.double().view(1, -1, 1)
    assert y.dtype == x_dtype
    torch.testing.assert_close(y.double(), expected, **({} if x_dtype == D64 else {"rtol": 1e-6, "atol": 1e-6}))
    assert running_x2.dtype == running_dtype and torch.equal(
        running_x2.double(), torch.tensor([0.5, 2.0, 4.0], dtype=D64)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F32, D64])
@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7)], ids=["conv", "linear"])
def test_weight_center_subtracts_each_units_mean_in_the_weights_dtype(dtype, shape) -> None:
    weight = (torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(0)) + 0.5).to(dtype)
    w = weight.double()
    expected = w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
    out = weight_center(weight)
    assert out.dtype == dtype and out.shape == weight.shape
    tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3, F32: 1e-6, D64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
