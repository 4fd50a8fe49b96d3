"""The EvoNorm functionals (``evonorm_b0``, ``evonorm_s0``) called directly, against their formulas written
out here in float64: EvoNorm-B0 ``gamma x / max(sqrt(var_b + eps), v x + sqrt(var_i + eps)) + beta`` and
EvoNorm-S0 ``gamma x sigmoid(v x) / sqrt(var_g + eps) + beta``. Outputs and gradients (autograd through the
formula, random upstream gradient) with and without gradients enabled, in training (running variance updated
with the unbiased batch variance) and at inference, on contiguous, channels_last, expanded, sliced and
transposed inputs, with buffers and parameters in another dtype than the input, and with partial affines."""

from __future__ import annotations

import warnings

import pytest
import torch

from normlightning.norms.functional.evonorm import evonorm_b0, evonorm_s0

D64 = torch.float64
EPS = 1e-3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _c(t: torch.Tensor, dims: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (dims - 2)))


def _b0_ref(x, v, gamma, beta, var_b, eps):
    """EvoNorm-B0 in float64; ``var_i`` the biased variance over the spatial dims of each map."""
    x, v, var_b = x.double(), v.double(), var_b.double()
    spatial = tuple(range(2, x.dim()))
    var_i = x.var(dim=spatial, unbiased=False, keepdim=True)
    den = torch.maximum(torch.sqrt(_c(var_b, x.dim()) + eps), _c(v, x.dim()) * x + torch.sqrt(var_i + eps))
    y = x / den
    y = y if gamma is None else _c(gamma.double(), x.dim()) * y
    return y if beta is None else y + _c(beta.double(), x.dim())


def _s0_ref(x, v, gamma, beta, groups, eps):
    """EvoNorm-S0 in float64; ``var_g`` the biased variance over (C/G, spatial) of one example."""
    x, v = x.double(), v.double()
    n, c = x.shape[:2]
    var_g = x.reshape(n, groups, -1).var(dim=2, unbiased=False)
    std = torch.sqrt(var_g + eps).repeat_interleave(c // groups, dim=1).view(n, c, *([1] * (x.dim() - 2)))
    y = x * torch.sigmoid(_c(v, x.dim()) * x) / std
    y = y if gamma is None else _c(gamma.double(), x.dim()) * y
    return y if beta is None else y + _c(beta.double(), x.dim())


# base shape, view: the view of a random base tensor has shape (2, 4, 3, 5)
_LAYOUTS = {
    "contiguous": ((2, 4, 3, 5), lambda t: t),
    "channels_last": ((2, 4, 3, 5), lambda t: t.contiguous(memory_format=torch.channels_last)),
    "expanded": ((1, 4, 3, 5), lambda t: t.expand(2, 4, 3, 5)),
    "channel-slice": ((2, 8, 3, 5), lambda t: t[:, ::2]),
    "transposed": ((2, 4, 5, 3), lambda t: t.transpose(2, 3)),
}


def _params(c: int, dtype=D64, seed: int = 3):
    g = _gen(seed)
    v = torch.randn(c, generator=g, dtype=dtype) * 0.5 + 0.3
    weight = torch.randn(c, generator=g, dtype=dtype) * 0.5 + 0.3
    bias = torch.randn(c, generator=g, dtype=dtype) * 0.5
    return v, weight, bias


def _grads(fn, x, tensors, upstream):
    """``fn(x, *tensors)`` and the gradients of ``sum(fn * upstream)`` for ``x`` and the tensors given."""
    x = x.detach().clone().requires_grad_(True)
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(x, *tensors)
    grads = torch.autograd.grad((y * upstream).sum(), [x, *tensors])
    return y.detach(), grads


# ------------------------------------------------------------------ EvoNorm-B0 at inference
@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_inference_on_every_layout(layout, grad) -> None:
    """At inference the batch variance is the running one; the instance variance of a non-contiguous
    input (mean, squared deviations, mean over S) equals that of a contiguous one."""
    shape, view = _LAYOUTS[layout]
    x = view(torch.randn(shape, dtype=D64, generator=_gen(1)) * 2 + 0.5)
    v, weight, bias = _params(4)
    running = torch.rand(4, dtype=D64, generator=_gen(4)) * 3 + 0.2
    before = running.clone()
    expected = _b0_ref(x, v, weight, bias, running, EPS)
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, running, weight, bias, training=False, factor=0.5, eps=EPS)
    torch.testing.assert_close(y, expected)
    assert y.shape == x.shape
    assert torch.equal(running, before)  # inference does not update


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_evonorm_b0_inference_gradients_on_every_layout(layout) -> None:
    shape, view = _LAYOUTS[layout]
    x = view(torch.randn(shape, dtype=D64, generator=_gen(1)) * 2 + 0.5)
    upstream = torch.randn(2, 4, 3, 5, dtype=D64, generator=_gen(2))
    running = torch.rand(4, dtype=D64, generator=_gen(4)) * 3 + 0.2

    def ours(x, v, w, b):
        return evonorm_b0(x, v, running, w, b, training=False, factor=0.1, eps=EPS)

    def ref(x, v, w, b):
        return _b0_ref(x, v, w, b, running, EPS)

    (y, g), (y_ref, g_ref) = _grads(ours, x, _params(4), upstream), _grads(ref, x, _params(4), upstream)
    torch.testing.assert_close(y, y_ref)
    for name, a, b in zip(["x", "v", "weight", "bias"], g, g_ref):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


@pytest.mark.parametrize("buffer_dtype", [torch.float32, D64], ids=["f32-buffer", "f64-buffer"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_inference_with_a_running_variance_of_another_dtype(buffer_dtype, grad) -> None:
    """A float64 input with a float32 running variance (exact in float64) and a float32 input with a
    float64 one: the output has the input's dtype and the formula's value."""
    in_dtype = D64 if buffer_dtype == torch.float32 else torch.float32
    x = (torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5).to(in_dtype)
    v, weight, bias = (p.to(in_dtype) for p in _params(4))
    running = (torch.rand(4, dtype=D64, generator=_gen(4)) * 3 + 0.2).to(buffer_dtype)
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, running, weight, bias, training=False, factor=0.0, eps=EPS)
    assert y.dtype == in_dtype
    tol = {} if in_dtype == D64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), _b0_ref(x, v, weight, bias, running, EPS), **tol)


# ------------------------------------------------------------------ EvoNorm-B0 in training
def _unbiased_batch_var(x):
    return x.double().var(dim=(0, *range(2, x.dim())), unbiased=True)


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_training_output_and_running_update(layout, grad) -> None:
    """Training: the batch variance over (N, S), and the running variance moved by ``factor`` towards
    the unbiased batch variance."""
    shape, view = _LAYOUTS[layout]
    x = view(torch.randn(shape, dtype=D64, generator=_gen(1)) * 2 + 0.5)
    v, weight, bias = _params(4)
    running = torch.rand(4, dtype=D64, generator=_gen(4)) + 0.5
    start = running.clone()
    expected = _b0_ref(x, v, weight, bias, x.var(dim=(0, 2, 3), unbiased=False), EPS)
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, running, weight, bias, training=True, factor=0.25, eps=EPS)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(running, 0.75 * start + 0.25 * _unbiased_batch_var(x))


@pytest.mark.parametrize(
    "in_dtype, buffer_dtype", [(D64, torch.float32), (torch.float32, D64)], ids=["f64-f32", "f32-f64"]
)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_training_with_a_running_variance_of_another_dtype(in_dtype, buffer_dtype, grad) -> None:
    """A buffer of another dtype than the input is updated too (outside the batch-norm kernel), in its
    own dtype, and the output is the formula's."""
    x = (torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5).to(in_dtype)
    v, weight, bias = (p.to(in_dtype) for p in _params(4))
    running = (torch.rand(4, dtype=D64, generator=_gen(4)) + 0.5).to(buffer_dtype)
    start = running.clone().double()
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, running, weight, bias, training=True, factor=0.4, eps=EPS)
    assert y.dtype == in_dtype and running.dtype == buffer_dtype
    tol = {"rtol": 1e-5, "atol": 1e-5}
    expected = _b0_ref(x, v, weight, bias, x.double().var(dim=(0, 2), unbiased=False), EPS)
    torch.testing.assert_close(y.double(), expected, **tol)
    torch.testing.assert_close(running.double(), 0.6 * start + 0.4 * _unbiased_batch_var(x), **tol)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_training_without_an_update(grad) -> None:
    """``factor=0`` leaves the running variance as it is (any dtype), and ``running_var=None`` trains
    without one; the output is the formula's with the batch variance either way."""
    x = torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = _params(4)
    expected = _b0_ref(x, v, weight, bias, x.var(dim=(0, 2), unbiased=False), EPS)
    for running in (torch.full((4,), 2.0, dtype=D64), torch.full((4,), 2.0), None):
        with torch.set_grad_enabled(grad):
            y = evonorm_b0(x, v, running, weight, bias, training=True, factor=0.0, eps=EPS)
        torch.testing.assert_close(y, expected)
        if running is not None:
            assert torch.equal(running, torch.full((4,), 2.0, dtype=running.dtype))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_partial_affines(training, affine, grad) -> None:
    """Only gamma, only beta or neither: the missing one is 1 (resp. 0)."""
    x = torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = _params(4)
    weight = weight if affine == "weight" else None
    bias = bias if affine == "bias" else None
    running = torch.rand(4, dtype=D64, generator=_gen(4)) + 0.5
    var_b = x.var(dim=(0, 2), unbiased=False) if training else running
    expected = _b0_ref(x, v, weight, bias, var_b, EPS)
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, running.clone(), weight, bias, training=training, factor=0.1, eps=EPS)
    torch.testing.assert_close(y, expected)


def test_evonorm_b0_training_gradients_with_partial_affines_and_float32_buffer() -> None:
    """Training gradients of x and v (and of the one affine parameter given) against autograd through the
    formula, with a float32 running variance on a float64 input (updated outside the kernel)."""
    x = torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    upstream = torch.randn(x.shape, dtype=D64, generator=_gen(2))
    v, weight, bias = _params(4)
    for w_given in (True, False):
        running = torch.ones(4)

        def ours(x, v, p, w_given=w_given, running=running):
            w, b = (p, None) if w_given else (None, p)
            return evonorm_b0(x, v, running, w, b, training=True, factor=0.5, eps=EPS)

        def ref(x, v, p, w_given=w_given):
            w, b = (p, None) if w_given else (None, p)
            return _b0_ref(x, v, w, b, x.var(dim=(0, 2), unbiased=False), EPS)

        p = weight if w_given else bias
        (y, g), (y_ref, g_ref) = _grads(ours, x, [v, p], upstream), _grads(ref, x, [v, p], upstream)
        torch.testing.assert_close(y, y_ref)
        for name, a, b in zip(["x", "v", "affine"], g, g_ref):
            torch.testing.assert_close(a, b, msg=f"gradient of {name}")


# ------------------------------------------------------------------ EvoNorm-S0
@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_evonorm_s0_on_every_layout(layout, grad, affine) -> None:
    shape, view = _LAYOUTS[layout]
    x = view(torch.randn(shape, dtype=D64, generator=_gen(1)) * 2 + 0.5)
    v, weight, bias = _params(4)
    weight, bias = (weight, bias) if affine else (None, None)
    with torch.set_grad_enabled(grad):
        y = evonorm_s0(x, v, weight, bias, num_groups=2, eps=EPS)
    torch.testing.assert_close(y, _s0_ref(x, v, weight, bias, 2, EPS))
    assert y.shape == x.shape


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_evonorm_s0_gradients_on_every_layout(layout) -> None:
    shape, view = _LAYOUTS[layout]
    x = view(torch.randn(shape, dtype=D64, generator=_gen(1)) * 2 + 0.5)
    upstream = torch.randn(2, 4, 3, 5, dtype=D64, generator=_gen(2))

    def ours(x, v, w, b):
        return evonorm_s0(x, v, w, b, num_groups=2, eps=EPS, training=True)

    def ref(x, v, w, b):
        return _s0_ref(x, v, w, b, 2, EPS)

    (y, g), (y_ref, g_ref) = _grads(ours, x, _params(4), upstream), _grads(ref, x, _params(4), upstream)
    torch.testing.assert_close(y, y_ref)
    for name, a, b in zip(["x", "v", "weight", "bias"], g, g_ref):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


def test_evonorm_s0_partial_affines() -> None:
    x = torch.randn(2, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = _params(4)
    for w, b in ((weight, None), (None, bias)):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                y = evonorm_s0(x, v, w, b, num_groups=4, eps=EPS)
            torch.testing.assert_close(y, _s0_ref(x, v, w, b, 4, EPS))


def test_evonorm_s0_is_not_in_training_by_default() -> None:
    """``training`` defaults to False: sets of one value are then allowed (variance 0, scale 1/sqrt(eps))."""
    x = torch.randn(3, 4, 1, 1, dtype=D64, generator=_gen(1))
    v, weight, bias = _params(4)
    y = evonorm_s0(x, v, weight, bias, num_groups=4, eps=EPS)
    torch.testing.assert_close(y, _s0_ref(x, v, weight, bias, 4, EPS))
    with pytest.raises(ValueError, match="EvoNormS0 has 1 element"):
        evonorm_s0(x, v, weight, bias, num_groups=4, eps=EPS, training=True)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_params_of_another_dtype(grad) -> None:
    """Float32 v and affine on a float64 input (exact in float64) give the float64 formula's output."""
    x = torch.randn(2, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = (p.float() for p in _params(4))
    running = torch.rand(4, dtype=D64, generator=_gen(4)) + 0.5
    with torch.set_grad_enabled(grad):
        y_s0 = evonorm_s0(x, v, weight, bias, num_groups=2, eps=EPS)
        y_b0 = evonorm_b0(x, v, running, weight, bias, training=False, factor=0.0, eps=EPS)
    assert y_s0.dtype == D64 and y_b0.dtype == D64
    torch.testing.assert_close(y_s0, _s0_ref(x, v, weight, bias, 2, EPS))
    torch.testing.assert_close(y_b0, _b0_ref(x, v, weight, bias, running, EPS))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_training_without_a_running_variance_at_any_factor(grad) -> None:
    """``running_var=None`` in training with a nonzero ``factor``: nothing to update, the output the formula's."""
    x = torch.randn(3, 4, 6, dtype=D64, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = _params(4)
    with torch.set_grad_enabled(grad):
        y = evonorm_b0(x, v, None, weight, bias, training=True, factor=0.3, eps=EPS)
    torch.testing.assert_close(y, _b0_ref(x, v, weight, bias, x.var(dim=(0, 2), unbiased=False), EPS))


def test_evonorm_s0_refusal_names_the_fix() -> None:
    x = torch.randn(3, 4, 1, 1)
    v = torch.zeros(4)
    with pytest.raises(
        ValueError,
        match=r"EvoNormS0 has 1 element.*undefined\)\. use fewer groups \(num_groups\) or inputs with more positions$",
    ):
        evonorm_s0(x, v, None, None, num_groups=4, eps=EPS, training=True)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_params_are_cast_to_the_input_dtype(grad) -> None:
    """Float64 v, gamma, beta on a float32 input compute in float32: the output is the one of the same
    parameters rounded to float32 first, in float32."""
    x = torch.randn(2, 4, 3, 5, generator=_gen(1)) * 2 + 0.5
    params = _params(4)
    running = torch.rand(4, generator=_gen(4)) + 0.5
    with torch.set_grad_enabled(grad):
        for fn in (
            lambda v, w, b: evonorm_s0(x, v, w, b, num_groups=2, eps=EPS),
            lambda v, w, b: evonorm_b0(x, v, running, w, b, training=False, factor=0.0, eps=EPS),
        ):
            y64, y32 = fn(*params), fn(*(p.float() for p in params))
            assert y64.dtype == torch.float32
            assert torch.equal(y64, y32)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_running_variance_update_is_batch_norms(grad) -> None:
    """A float32 running variance on a float32 input moves exactly (bitwise) as torch's own batch norm
    moves its running variance on the same batch and momentum."""
    x = torch.randn(3, 4, 7, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = (p.float() for p in _params(4))
    running = torch.rand(4, generator=_gen(4)) + 0.5
    expected = running.clone()
    torch.nn.functional.batch_norm(x, torch.zeros(4), expected, training=True, momentum=0.3)
    with torch.set_grad_enabled(grad):
        evonorm_b0(x, v, running, weight, bias, training=True, factor=0.3, eps=EPS)
    assert torch.equal(running, expected)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_training_emits_no_warning(grad, capfd) -> None:
    """Training (statistics written into preallocated outputs of the right shapes) warns of nothing, neither
    as a Python warning nor on stderr (where ATen prints an out= tensor's resize)."""
    x = torch.randn(3, 4, 6, dtype=D64, generator=_gen(1))
    v, weight, bias = _params(4)
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.set_grad_enabled(grad):
            evonorm_b0(x, v, torch.ones(4, dtype=D64), weight, bias, training=True, factor=0.1, eps=EPS)
    assert capfd.readouterr().err == ""


def test_evonorm_b0_refusal_names_the_fix() -> None:
    x = torch.randn(3, 4, 1, 1)
    with pytest.raises(
        ValueError,
        match=r"instance variance has 1 element.*\)\. use more than one position per channel map, or another method$",
    ):
        evonorm_b0(x, torch.zeros(4), None, None, None, training=True, factor=0.0, eps=EPS)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_evonorm_b0_running_variance_is_cast_to_the_input_dtype(grad) -> None:
    """At inference a float64 running variance on a float32 input (and a float32 one on a float64 input)
    acts as the same values in the input's dtype: the output equals the one with the cast buffer."""
    v, weight, bias = _params(4)
    running = torch.rand(4, dtype=D64, generator=_gen(4)) * 3 + 0.2
    for dtype in (torch.float32, D64):
        x = (torch.randn(2, 4, 3, 5, dtype=D64, generator=_gen(1)) * 2 + 0.5).to(dtype)
        params = [p.to(dtype) for p in (v, weight, bias)]
        other = running.float() if dtype == D64 else running
        with torch.set_grad_enabled(grad):
            y = evonorm_b0(x, params[0], other, *params[1:], training=False, factor=0.0, eps=EPS)
            y_cast = evonorm_b0(x, params[0], other.to(dtype), *params[1:], training=False, factor=0.0, eps=EPS)
        assert y.dtype == dtype and torch.equal(y, y_cast)


def test_evonorm_b0_inference_with_gradients_compiles_in_one_graph() -> None:
    """At inference with gradients enabled, torch.compile (Dynamo, ``fullgraph=True``) captures EvoNorm-B0
    in one graph (its autograd node never gets the running variance twice among its inputs), with the
    formula's output."""
    torch._dynamo.reset()
    x = torch.randn(2, 4, 3, 5, generator=_gen(1)) * 2 + 0.5
    v, weight, bias = (p.float() for p in _params(4))
    running = torch.rand(4, generator=_gen(4)) + 0.5
    fn = torch.compile(
        lambda x: evonorm_b0(x, v, running, weight, bias, training=False, factor=0.1, eps=EPS),
        backend="eager",
        fullgraph=True,
    )
    y = fn(x.requires_grad_(True))
    torch.testing.assert_close(y.double(), _b0_ref(x.detach(), v, weight, bias, running, EPS), rtol=1e-5, atol=1e-5)
