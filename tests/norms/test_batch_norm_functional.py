"""``batch_norm``, ``batch_renorm`` and the group views of ``group_batch_norm`` (norms/functional/batch_norm.py)
against independent references (docs/methods.md, sections bn, brn, bgn):

- bn: ``torch.nn.functional.batch_norm`` (training, eval, the defaults momentum 0.1 and eps 1e-5), inference
  example weighing written out in float64 (``mu = (1-a) mu_pop + a mu_ex``, ``s = (1-a) E_pop[x^2] + a E_ex[x^2]``,
  ``y = (x - mu) / sqrt(max(s - mu^2, 0) + eps)``), running buffers of another dtype used in the compute dtype;
- brn: the formula written out in float64, ``r = clip(sigma_B / sigma_run, 1/r_max, r_max)``,
  ``d = clip((mu_B - mu_run) / sigma_run, d_min, d_max)`` (``d_min = -d_max`` by default), both without gradient,
  ``y = gamma ((x - mu_B) / sigma_B r + d) + beta``, the running statistics updated with the unbiased variance;
  gradients against autograd through that reference with a random upstream gradient; ``reference``, ``d_min``,
  tensor limits, every combination of weight / bias;
- synchronized statistics (both): a world of two processes simulated by a recorded all-reduce that adds a second
  process holding the same batch (same mean and biased variance, twice the count: the running variance's
  ``n / (n - 1)`` factor shows the count), the all-reduces' group asserted; local statistics by default;
- the group views: ``(N, G, D/G)`` for contiguous inputs, ``(N*S, G, C/G)`` views of channels_last inputs whose
  groups are at least 8 whole channels (and the way back), ``group_batch_norm`` on channels_last and non-dense
  inputs against the bgn formula, with the copies the docstring promises counted by ``ComputeOpCounter``;
- the set-size error messages.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from normlightning.norms.functional import batch_norm, batch_renorm
from normlightning.norms.functional.batch_norm import _from_group_view, _group_view, group_batch_norm
from normlightning.norms.op_count import ComputeOpCounter

F64 = torch.float64
C = 3
DIMS = (0, 2, 3)


def _batch(N: int = 4, *, seed: int = 0, dtype=F64):
    """``x (N, C, 2, 3)``, running mean / var and an affine with no entry equal to 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, 2, 3, generator=g, dtype=F64) * 2 + 0.5
    running_mean = torch.randn(C, generator=g, dtype=F64)
    running_var = torch.rand(C, generator=g, dtype=F64) + 0.5
    weight = torch.rand(C, generator=g, dtype=F64) + 1.5
    bias = torch.rand(C, generator=g, dtype=F64) + 0.5
    return [t.to(dtype) for t in (x, running_mean, running_var, weight, bias)]


def _unbiased(x, copies: int = 1):
    """The unbiased variance per channel of ``copies`` copies of ``x`` (the union across processes)."""
    return torch.cat([x] * copies).var(dim=DIMS, unbiased=True)


# ---------------------------------------------------------------------------------------------------------- bn


def test_bn_training_defaults_are_momentum_0_1_and_eps_1e_5():
    x, rm, rv, w, b = _batch()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, True)
    y_ref = F.batch_norm(x, rm_ref, rv_ref, w, b, training=True, momentum=0.1, eps=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-12)


def test_bn_eval_normalizes_with_the_running_statistics():
    x, rm, rv, w, b = _batch()
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, False, eps=0.5)
    torch.testing.assert_close(y, F.batch_norm(x, rm0, rv0, w, b, False, eps=0.5), rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def _example_weighted_reference(x, pop_mean, pop_var, w, b, alpha, eps):
    """Inference example weighing (docs/methods.md) per ``(n, c)`` over the example's spatial values, float64."""
    pop_mean, pop_var = pop_mean.double().view(1, -1, 1, 1), pop_var.double().view(1, -1, 1, 1)
    mu = (1 - alpha) * pop_mean + alpha * x.mean(dim=(2, 3), keepdim=True)
    s = (1 - alpha) * (pop_var + pop_mean**2) + alpha * (x * x).mean(dim=(2, 3), keepdim=True)
    y = (x - mu) / torch.sqrt((s - mu**2).clamp_min(0) + eps)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def test_bn_example_weighing_with_float32_buffers_on_float64_input():
    """``alpha > 0`` in eval: float32 running buffers (a float32 layer) on float64 input, the mixture computed in
    float64 (the buffers' float32 values taken exactly)."""
    x, rm, rv, w, b = _batch()
    rm, rv = rm.float(), rv.float()
    y = batch_norm(x, rm, rv, w, b, False, eps=1e-3, alpha=0.3)
    assert y.dtype == F64
    torch.testing.assert_close(y, _example_weighted_reference(x, rm, rv, w, b, 0.3, 1e-3), rtol=1e-12, atol=1e-12)


def test_bn_example_weighing_uses_the_buffers_in_the_compute_dtype():
    """float64 running buffers on float32 input: the buffers are converted to float32 and the mixture computed in
    float32, exactly as with float32 copies of the buffers (and close to the float64 formula)."""
    x, rm, rv, w, b = _batch(dtype=torch.float32)
    rm, rv = rm.double() + 1e-9, rv.double() + 1e-9  # values that float32 rounds
    y = batch_norm(x, rm, rv, w, b, False, eps=1e-3, alpha=0.3)
    assert y.dtype == torch.float32
    assert torch.equal(y, batch_norm(x, rm.float(), rv.float(), w, b, False, eps=1e-3, alpha=0.3))
    y_ref = _example_weighted_reference(x.double(), rm, rv, w.double(), b.double(), 0.3, 1e-3)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_bn_synchronized_training_all_reduces_over_the_given_group(two_process_world):
    """``sync=True``: two all-reduces (mean, centred squares) over ``process_group``; the output is BN of the
    union (the affine applied), the running variance has the count of both processes."""
    group = object()
    x, rm, rv, w, b = _batch()
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, True, factor=0.25, eps=1e-3, sync=True, process_group=group)
    assert two_process_world.groups == [group, group]
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, b, True, eps=1e-3), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * x.mean(dim=DIMS), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * _unbiased(x, copies=2), rtol=1e-12, atol=1e-12)


def test_bn_statistics_are_local_by_default_in_an_initialized_world(two_process_world):
    x, rm, rv, w, b = _batch()
    rv0 = rv.clone()
    batch_norm(x, rm, rv, w, b, True)
    assert two_process_world.groups == []
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * _unbiased(x), rtol=1e-12, atol=1e-12)


def test_bn_synchronized_eval_uses_the_running_statistics(two_process_world):
    """``sync`` only concerns training: eval normalizes with the running statistics, no all-reduce."""
    x, rm, rv, w, b = _batch()
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm(x, rm, rv, w, b, False, sync=True, process_group=object())
    assert two_process_world.groups == []
    torch.testing.assert_close(y, F.batch_norm(x, rm0, rv0, w, b, False), rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_bn_set_of_one_value_is_refused_naming_the_fix():
    """N = 1 example of (N, C) features in training: one value per channel."""
    x, rm, rv, w, b = _batch(1)
    message = (
        "BatchNorm input has 1 element(s) per normalization set; a set needs more than 1 value (its variance is "
        "undefined). Use a batch of more than one example (N * S > 1)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        batch_norm(x[:, :, 0, 0], rm, rv, w, b, True)


# --------------------------------------------------------------------------------------------------------- brn

R_MAX, D_MAX = 1.5, 0.5


def _brn_batch(seed: int = 0):
    """A batch and running statistics whose ``r, d`` are inside the limits on channel 0, above them on channel 1
    (running variance 1/16 of the batch's, running mean 2 sigma below) and below them on channel 2 (running
    variance 16 times the batch's, running mean 4 sigma above)."""
    x, _, _, w, b = _batch(6, seed=seed)
    mu, var = x.mean(dim=DIMS), x.var(dim=DIMS, unbiased=False)
    sd = var.sqrt()
    rm = mu + torch.tensor([0.1, -2.0, 4.0], dtype=F64) * sd
    rv = var * torch.tensor([1.2, 1 / 16, 16.0], dtype=F64)
    return x, rm, rv, w, b


def _brn_reference(x, mu_run, var_run, w, b, r_max, d_max, eps, d_min=None):
    """Batch Renormalization written out (float64); ``r, d`` detached. Also returns ``r, d``."""
    mu = x.mean(dim=DIMS, keepdim=True)
    sigma = torch.sqrt(x.var(dim=DIMS, unbiased=False, keepdim=True) + eps)
    sigma_run = torch.sqrt(var_run.double().view(1, -1, 1, 1) + eps)
    r = (sigma / sigma_run).clamp(1 / r_max, r_max).detach()
    d = ((mu - mu_run.double().view(1, -1, 1, 1)) / sigma_run).clamp(-d_max if d_min is None else d_min, d_max)
    d = d.detach()
    y = (x - mu) / sigma * r + d
    if w is not None:
        y = y * w.view(1, -1, 1, 1)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y, r.view(-1), d.view(-1)


def _check_brn(x, rm, rv, w, b, eps, y_fn, d_min=None, copies: int = 1, factor: float = 0.1, ref=None):
    """``y_fn(x, rm, rv, w, b)`` (running buffers updated in place) against the reference: output, running
    statistics and the gradients of a random upstream gradient with respect to ``x`` and the affine."""
    params = [t for t in (w, b) if t is not None]
    leaves = [x.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in params]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]

    def split(ls):
        it = iter(ls[1:])
        return ls[0], (next(it) if w is not None else None), (next(it) if b is not None else None)

    rm0, rv0 = rm.clone(), rv.clone()
    xa, wa, ba = split(leaves)
    y = y_fn(xa, rm, rv, wa, ba)
    xr, wr, br = split(ref_leaves)
    mu_ref, var_ref = (rm0, rv0) if ref is None else ref
    y_ref, r, d = _brn_reference(xr, mu_ref, var_ref, wr, br, R_MAX, D_MAX, eps, d_min=d_min)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    grads = torch.autograd.grad(y, leaves, g)
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, (1 - factor) * rm0 + factor * x.mean(dim=DIMS), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, (1 - factor) * rv0 + factor * _unbiased(x, copies), rtol=1e-12, atol=1e-12)
    return r, d


def test_brn_test_batch_has_r_and_d_inside_above_and_below_the_limits():
    """(The fixture the brn tests rely on: every clipping case occurs.)"""
    x, rm, rv, w, b = _brn_batch()
    _, r, d = _brn_reference(x, rm, rv, w, b, R_MAX, D_MAX, 1e-5)
    assert 1 / R_MAX < r[0] < R_MAX and r[1] == R_MAX and r[2] == 1 / R_MAX
    assert -D_MAX < d[0] < D_MAX and d[0] != 0 and d[1] == D_MAX and d[2] == -D_MAX


@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_brn_defaults_output_gradients_and_running_statistics(affine):
    """Float limits, no ``factor``/``eps``: momentum 0.1, eps 1e-5, ``d_min = -d_max``, local statistics; every
    combination of weight and bias (``gamma = 1``, ``beta = 0`` where ``None``)."""
    x, rm, rv, w, b = _brn_batch()
    w = w if affine in ("both", "weight") else None
    b = b if affine in ("both", "bias") else None
    _check_brn(x, rm, rv, w, b, 1e-5, lambda *a: batch_renorm(*a, R_MAX, D_MAX))


@pytest.mark.parametrize("d_min", [-0.2, torch.tensor(-0.2, dtype=F64)])
def test_brn_tensor_limits_d_min_factor_and_eps(d_min):
    """0-d tensor limits (as the layer passes them) and a ``d_min`` other than ``-d_max`` (float and 0-d tensor)."""
    x, rm, rv, w, b = _brn_batch()
    r_max, d_max = torch.tensor(R_MAX, dtype=F64), torch.tensor(D_MAX, dtype=F64)

    def fn(x_, m, v, w_, b_):
        return batch_renorm(x_, m, v, w_, b_, r_max, d_max, factor=0.3, eps=1e-2, d_min=d_min)

    _, d = _check_brn(x, rm, rv, w, b, 1e-2, fn, d_min=-0.2, factor=0.3)
    assert d[2] == -0.2


def test_brn_reference_statistics_give_r_and_d_and_the_buffers_still_update():
    """``reference = (mu, var)``: ``r, d`` from it (float32 here, on float64 input: taken exactly, computed in
    float64), the running buffers updated from their own values."""
    x, rm, rv, w, b = _brn_batch()
    ref = (rm.float(), rv.float())
    ref64 = (ref[0].double(), ref[1].double())
    buffers = (torch.zeros(C, dtype=F64), torch.ones(C, dtype=F64))
    r, _ = _check_brn(x, *buffers, w, b, 1e-5, lambda *a: batch_renorm(*a, R_MAX, D_MAX, reference=ref), ref=ref64)
    assert 1 / R_MAX < r[0] < R_MAX


def test_brn_float64_reference_on_float32_input():
    """A float64 ``reference`` on float32 input (buffers and affine float32): ``r, d`` in float32, the output
    float32 and close to the float64 formula."""
    x, rm, rv, w, b = _brn_batch()
    x32, w32, b32 = x.float(), w.float(), b.float()
    buffers = (torch.zeros(C), torch.ones(C))
    y = batch_renorm(x32, *buffers, w32, b32, R_MAX, D_MAX, reference=(rm, rv))
    assert y.dtype == torch.float32
    y_ref, _, _ = _brn_reference(x32.double(), rm, rv, w32.double(), b32.double(), R_MAX, D_MAX, 1e-5)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_brn_synchronized_statistics_are_all_reduced_over_the_given_group(two_process_world):
    """``sync=True``: ``r, d`` from the synchronized moments (two all-reduces) and the normalization over the
    union (two more), all over ``process_group``; the running variance has the count of both processes."""
    group = object()
    x, rm, rv, w, b = _brn_batch()

    def fn(*a):
        return batch_renorm(*a, R_MAX, D_MAX, sync=True, process_group=group)

    _check_brn(x, rm, rv, w, b, 1e-5, fn, copies=2)
    assert two_process_world.groups == [group] * 4


def test_brn_statistics_are_local_by_default_in_an_initialized_world(two_process_world):
    x, rm, rv, w, b = _brn_batch()
    _check_brn(x, rm, rv, w, b, 1e-5, lambda *a: batch_renorm(*a, R_MAX, D_MAX))
    assert two_process_world.groups == []


def test_brn_channels_last_input_is_normalized_in_its_layout_without_a_copy():
    """A channels_last input goes to the native kernel as it is: the output is channels_last, no copy."""
    x, rm, rv, w, b = _brn_batch()
    xc = x.contiguous(memory_format=torch.channels_last)
    buffers = (rm.clone(), rv.clone())
    with ComputeOpCounter() as counter:
        y = batch_renorm(xc, *buffers, w, b, R_MAX, D_MAX)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert counter.ops["clone"] + counter.ops["copy_"] + counter.ops["_to_copy"] == 0
    y_ref, _, _ = _brn_reference(x, rm, rv, w, b, R_MAX, D_MAX, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


def test_brn_set_of_one_value_is_refused_naming_the_fix():
    x, rm, rv, w, b = _batch(1)
    message = (
        "BatchRenorm input has 1 element(s) per normalization set; a set needs more than 1 value (its variance "
        "is undefined). Use a batch with N * S > 1."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        batch_renorm(x[:, :, 0, 0], rm, rv, w, b, R_MAX, D_MAX)


# ---------------------------------------------------------------------------------------- group views, bgn


def _group_input(shape, layout: str, seed: int = 0):
    """``x`` of ``shape`` (float64) laid out contiguous, channels_last(_3d) or non-dense (every other column of a
    wider tensor)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=F64) * 3 + 1
        return wide[..., ::2]
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 1
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _shares_storage(view, x) -> bool:
    return view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("C, G", [(16, 2), (14, 2), (17, 2), (24, 3)])
def test_group_view_is_n_g_d_over_g_unless_channels_last_with_groups_of_8_channels(C, G, layout):
    """``(N, G, D/G)``: entry ``[n, g]`` the ``g``-th block of example ``n``'s flattened ``(C, S)`` (a view of a
    contiguous input); a channels_last input whose groups are at least 8 whole channels (C/G = 8, 12) is viewed as
    ``(N*S, G, C/G)``, entry ``[n*S + s, g, j]`` = channel ``g C/G + j`` at position ``s``; groups of 7 channels
    and groups that are not whole channels (C = 17, G = 2) take the first form."""
    N, H, W = 2, 2, 3
    x = _group_input((N, C, H, W), layout)
    v = _group_view(x, G)
    k = C // G
    if layout == "channels_last" and C % G == 0 and k >= 8:
        assert v.shape == (N * H * W, G, k) and _shares_storage(v, x)
        for g in range(G):
            assert torch.equal(v[:, g, :], x[:, g * k : (g + 1) * k].permute(0, 2, 3, 1).reshape(N * H * W, k))
    else:
        assert v.shape == (N, G, C * H * W // G)
        flat = x.reshape(N, C * H * W)  # the flattened (C, S) of each example, in x's logical order
        block = C * H * W // G
        for g in range(G):
            assert torch.equal(v[:, g, :], flat[:, g * block : (g + 1) * block])
        if layout == "contiguous":
            assert _shares_storage(v, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape, G", [((2, 16, 3, 5), 2), ((2, 16, 3, 5), 4), ((2, 24, 2, 3, 5), 3)])
def test_from_group_view_restores_the_input_shape_as_a_view(shape, G, layout):
    """``_from_group_view`` inverts ``_group_view`` (all sizes distinct, so a wrong order of dims shows): the
    values back in place in ``x``'s shape, a view of the group view (channels_last: the channels_last layout)."""
    x = _group_input(shape, layout)
    v = _group_view(x, G)
    y = _from_group_view(v, x)
    assert y.shape == x.shape and torch.equal(y, x)
    if v.shape[0] != x.shape[0]:
        assert y.stride() == x.stride()
    assert _shares_storage(y, v)


def _bgn_reference(x, G, weight, bias, eps):
    """bgn with groups of the flattened ``(C, S)`` over the batch, written out (float64); also the groups' mean
    and unbiased variance."""
    N, C = x.shape[:2]
    xv = x.reshape(N, G, -1)
    mean, var = xv.mean(dim=(0, 2), keepdim=True), xv.var(dim=(0, 2), unbiased=False, keepdim=True)
    y = ((xv - mean) / torch.sqrt(var + eps)).reshape(N, C, -1)
    y = (y * weight.view(1, C, 1) + bias.view(1, C, 1)).reshape(x.shape)
    return y, mean.view(-1), xv.var(dim=(0, 2), unbiased=True)


def _copies(counter) -> int:
    return counter.ops["clone"] + counter.ops["copy_"] + counter.ops["_to_copy"]


def _group_batch_norm_run(x, G):
    """Output, running buffers, gradients (a random upstream gradient in the output's layout,
    ``torch.autograd.grad``: no accumulation into a leaf of another layout)
    and the number of copies (forward + backward) of ``group_batch_norm`` on ``x``."""
    C = x.shape[1]
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(C, generator=g, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.randn(C, generator=g, dtype=F64).requires_grad_(True)
    rm, rv = torch.randn(G, generator=g, dtype=F64), torch.rand(G, generator=g, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = x.detach().requires_grad_(True)
    up = torch.randn(x.shape, generator=g, dtype=F64)
    with ComputeOpCounter() as fwd:
        y = group_batch_norm(x, G, rm, rv, w, b, 0.25, 1e-3)
    up = torch.empty_like(y).copy_(up)  # in the output's layout, as the next layer's backward gives it
    with ComputeOpCounter() as bwd:
        grads = torch.autograd.grad(y, (x, w, b), up)
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y_ref, mean, uvar = _bgn_reference(xr, G, wr, br, 1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(y_ref, (xr, wr, br), up)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * uvar, rtol=1e-12, atol=1e-12)
    return y, _copies(fwd) + _copies(bwd)


@pytest.mark.parametrize(
    "shape, G, layout, viewed",
    [
        ((2, 16, 3, 5), 2, "channels_last", True),  # groups of 8 channels: viewed
        ((2, 24, 2, 3, 5), 2, "channels_last", True),  # channels_last_3d, groups of 12 channels
        ((2, 16, 3, 5), 4, "channels_last", False),  # groups of 4 channels: copied once
        ((2, 16, 3, 5), 3, "channels_last", False),  # groups across channels (D = 240 = 3 * 80): copied
        ((2, 16, 3, 5), 2, "strided", False),  # not dense: copied once
        ((2, 16, 3, 5), 4, "strided", False),
    ],
)
def test_group_batch_norm_views_or_copies_the_input_once(shape, G, layout, viewed):
    """Outputs, gradients and running statistics against the bgn formula for every layout; a channels_last input
    whose groups are at least 8 whole channels is viewed (no copy beyond those of a contiguous input, a
    channels_last output), any other one copied once to contiguous (one copy more, forward and backward
    together: the gradient is not copied again)."""
    x = _group_input(shape, layout)
    _, base_copies = _group_batch_norm_run(x.contiguous(), G)
    y, copies = _group_batch_norm_run(x, G)
    assert copies == base_copies + (0 if viewed else 1)
    if viewed:
        assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
