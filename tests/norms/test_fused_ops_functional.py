"""The fused helpers of ``normlightning.norms.functional.fused_ops`` against references written out here
(float64) (issue 27, its mutation survivors):

- ``channel_affine``: the per-channel affine ``y[:, c] * w[c] + b[c]`` on the ``(N, C, S)`` view of 2-d, 3-d,
  4-d (contiguous and channels_last) and 5-d inputs, with weight and bias, weight only, bias only, neither (then
  the input itself is returned);
- ``fma``: ``x * a + b`` elementwise with broadcasting, also where ``b`` broadcasts ``x * a`` to a larger shape,
  without writing into its operands;
- ``blocks``: ``repeat_interleave``; ``r == 1`` returns ``t`` itself (no copy), ``r > 1`` a dense contiguous
  tensor (also for a 1-element ``t``);
- ``scale_shift`` (``_ScaleShift``): the values of ``x * scale + shift`` and its gradients equal autograd's
  through that formula for a random upstream gradient, for every subset of operands that require grad
  (the others get no gradient), and pass ``gradcheck``;
- ``normalize_affine``: ``w_c (x - mu) / sqrt(var + eps) + b_c`` with per-example or shared statistics;
- ``RowMoments``: ``torch.var_mean(x, -1, unbiased)`` over the last dim, and its gradients (mean and/or
  variance used) equal autograd's through ``torch.var_mean``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from normlightning.norms.functional.fused_ops import (
    RowMoments,
    blocks,
    channel_affine,
    fma,
    normalize_affine,
    scale_shift,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _affine_reference(y3: torch.Tensor, weight, bias) -> torch.Tensor:
    """``y[:, c] * w[c] + b[c]`` channel by channel (float64)."""
    out = y3.to(F64).clone()
    for c in range(y3.shape[1]):
        if weight is not None:
            out[:, c] = out[:, c] * weight[c].to(F64)
        if bias is not None:
            out[:, c] = out[:, c] + bias[c].to(F64)
    return out


_LAYOUTS = [
    ((4, 3), None),
    ((2, 3, 5), None),
    ((2, 3, 4, 5), None),
    ((2, 3, 4, 5), torch.channels_last),
    ((2, 3, 2, 3, 4), None),
    ((2, 3, 2, 3, 4), torch.channels_last_3d),
]


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize(("shape", "fmt"), _LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_channel_affine_is_the_per_channel_affine(shape, fmt, affine, dtype):
    g = _gen(0)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    weight = torch.randn(C, generator=g, dtype=dtype) + 2.0 if affine in ("both", "weight") else None
    bias = torch.randn(C, generator=g, dtype=dtype) if affine in ("both", "bias") else None
    y3 = x.reshape(shape[0], C, -1)
    out = channel_affine(y3, weight, bias)
    if affine == "none":
        assert out is y3
    assert out.dtype == dtype
    assert out.shape == y3.shape
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(out.to(F64), _affine_reference(y3, weight, bias), rtol=tol, atol=tol)


@pytest.mark.parametrize("affine", ["both", "weight", "bias"])
def test_channel_affine_gradients_match_the_plain_formula(affine):
    g = _gen(1)
    y3 = torch.randn(3, 4, 5, generator=g, dtype=F64, requires_grad=True)
    weight = (torch.randn(4, generator=g, dtype=F64) + 2.0).requires_grad_() if affine != "bias" else None
    bias = torch.randn(4, generator=g, dtype=F64).requires_grad_() if affine != "weight" else None
    inputs = [t for t in (y3, weight, bias) if t is not None]
    upstream = torch.randn(3, 4, 5, generator=g, dtype=F64)
    got = torch.autograd.grad(channel_affine(y3, weight, bias), inputs, upstream)
    ref = y3
    if weight is not None:
        ref = ref * weight[None, :, None]
    if bias is not None:
        ref = ref + bias[None, :, None]
    want = torch.autograd.grad(ref, inputs, upstream)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("x_shape", "a_shape", "b_shape"),
    [
        ((2, 3, 4), (1, 3, 1), (1, 3, 1)),  # statistic-sized a, b
        ((2, 3, 4), (2, 3, 4), (2, 3, 4)),  # all full-size
        ((2, 3, 4), (2, 3, 1), ()),  # 0-d b
        ((2, 3, 1), (1, 3, 1), (2, 3, 4)),  # b broadcasts x * a to a larger shape
        ((3, 1), (1,), (2, 3, 4)),  # ... and to more dims
    ],
)
def test_fma_is_x_times_a_plus_b_with_broadcasting(x_shape, a_shape, b_shape):
    g = _gen(2)
    x, a, b = (torch.randn(s, generator=g, dtype=F64) for s in (x_shape, a_shape, b_shape))
    copies = [t.clone() for t in (x, a, b)]
    out = fma(x, a, b)
    want = torch.empty(torch.broadcast_shapes(x_shape, a_shape, b_shape), dtype=F64)
    for idx in itertools.product(*(range(n) for n in want.shape)):
        xi, ai, bi = (t.expand(want.shape)[idx] for t in (x, a, b))
        want[idx] = xi * ai + bi
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for t, c in zip((x, a, b), copies):  # operands untouched
        assert torch.equal(t, c)


def test_blocks_repeats_each_entry_r_times():
    t = torch.tensor([1.0, -2.0, 3.5])
    for r in (2, 3):
        out = blocks(t, r)
        torch.testing.assert_close(out, torch.repeat_interleave(t, r), rtol=0, atol=0)
        assert out.is_contiguous()
    one = torch.tensor([4.0])
    out = blocks(one, 5)  # a dense tensor, not a stride-0 view of the single value
    assert out.stride() == (1,)
    torch.testing.assert_close(out, torch.full((5,), 4.0), rtol=0, atol=0)


def test_blocks_with_one_repeat_returns_the_tensor_itself():
    """``r == 1`` repeats nothing: the input comes back as it is, with no copy."""
    t = torch.tensor([1.0, -2.0, 3.5])
    assert blocks(t, 1) is t


_SS_SHAPES = [((3, 4, 5), (3, 4, 1), (3, 4, 1)), ((3, 4, 5), (1, 4, 1), (1, 4, 1)), ((3, 4, 5), (1, 4, 1), (3, 4, 1))]


@pytest.mark.parametrize(("x_shape", "scale_shape", "shift_shape"), _SS_SHAPES)
@pytest.mark.parametrize(
    "needs",
    [m for m in itertools.product([False, True], repeat=3) if any(m)],
    ids=lambda m: "".join("xss"[i] if v else "-" for i, v in enumerate(m)),
)
def test_scale_shift_values_and_gradients_match_the_plain_formula(x_shape, scale_shape, shift_shape, needs):
    g = _gen(3)
    x, scale, shift = (torch.randn(*s, generator=g, dtype=F64) for s in (x_shape, scale_shape, shift_shape))
    ops = [t.requires_grad_(n) for t, n in zip((x, scale, shift), needs)]
    out = scale_shift(*ops)
    ref = x * scale + shift
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(*x_shape, generator=g, dtype=F64)
    wanted = [t for t in ops if t.requires_grad]
    got = torch.autograd.grad(out, wanted, upstream)
    want = torch.autograd.grad(ref, wanted, upstream)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # through .backward(): operands that do not require grad get none
    for t in ops:
        t.grad = None
    scale_shift(*ops).backward(upstream)
    for t, n in zip(ops, needs):
        assert (t.grad is not None) == n


@pytest.mark.parametrize(
    "needs",
    [m for m in itertools.product([False, True], repeat=3) if any(m)],
    ids=lambda m: "".join("xss"[i] if v else "-" for i, v in enumerate(m)),
)
def test_scale_shift_passes_gradcheck(needs):
    g = _gen(4)
    x = torch.randn(2, 3, 4, generator=g, dtype=F64).requires_grad_(needs[0])
    scale = torch.randn(1, 3, 1, generator=g, dtype=F64).requires_grad_(needs[1])
    shift = torch.randn(2, 3, 1, generator=g, dtype=F64).requires_grad_(needs[2])
    assert torch.autograd.gradcheck(scale_shift, (x, scale, shift))


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("stats_n", [1, 3])
def test_normalize_affine_is_the_normalized_per_channel_affine(affine, stats_n):
    g = _gen(5)
    N, C, S, eps = 3, 4, 5, 1e-3
    x = torch.randn(N, C, S, generator=g, dtype=F64)
    mu = torch.randn(stats_n, C, 1, generator=g, dtype=F64)
    var = torch.rand(stats_n, C, 1, generator=g, dtype=F64) + 0.5
    weight = torch.randn(C, generator=g, dtype=F64) + 2.0 if affine in ("both", "weight") else None
    bias = torch.randn(C, generator=g, dtype=F64) if affine in ("both", "bias") else None
    out = normalize_affine(x, mu, var, weight, bias, eps)
    want = torch.empty(N, C, S, dtype=F64)
    for n, c in itertools.product(range(N), range(C)):
        k = n if stats_n > 1 else 0
        v = (x[n, c] - mu[k, c, 0]) / (var[k, c, 0] + eps) ** 0.5
        want[n, c] = v * (weight[c] if weight is not None else 1.0) + (bias[c] if bias is not None else 0.0)
    assert out.shape == (N, C, S)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use", ["both", "mean", "var"])
def test_row_moments_match_var_mean_values_and_gradients(use):
    g = _gen(6)
    x = (torch.randn(3, 4, 7, generator=g, dtype=F64) * 2.0 + 5.0).requires_grad_()
    mean, var = RowMoments.apply(x)
    ref_var, ref_mean = torch.var_mean(x, -1, correction=0, keepdim=True)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    g_mean = torch.randn(3, 4, 1, generator=g, dtype=F64)
    g_var = torch.randn(3, 4, 1, generator=g, dtype=F64)
    outs, refs, ups = [], [], []
    if use != "var":
        outs.append(mean), refs.append(ref_mean), ups.append(g_mean)
    if use != "mean":
        outs.append(var), refs.append(ref_var), ups.append(g_var)
    (got,) = torch.autograd.grad(outs, x, ups)
    (want,) = torch.autograd.grad(refs, x, ups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_row_moments_pass_gradcheck():
    x = torch.randn(2, 3, 5, generator=_gen(7), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: RowMoments.apply(t), (x,))
    assert torch.autograd.gradcheck(lambda t: RowMoments.apply(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: RowMoments.apply(t)[1], (x,))
