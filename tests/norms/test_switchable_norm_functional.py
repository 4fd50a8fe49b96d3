"""``switchable_norm`` (norms/functional/switchable_norm.py, docs/methods.md, section sn) against the definition
written out here in float64:

- per ``(n, c)`` the IN moments over ``S`` (biased), the LN moments per example pooled over ``(C, S)`` (mean of the
  IN means, mean of ``var_in + (mu_in - mu_ln)^2``), the BN moments per channel pooled over ``(N, S)`` in training
  and the running statistics in eval; ``mu = sum_k softmax(mean_logits)_k mu_k``,
  ``var = sum_k softmax(var_logits)_k var_k``, ``y = gamma_c (x - mu) / sqrt(var + eps) + beta_c``;
- eval without gradients (the affine folded into the native pass), with every combination of weight and bias,
  on ``(N, C)``, ``(N, C, L)`` and ``(N, C, H, W)`` inputs; eval with gradients enabled: the gradients of the
  input, the affine and both logits are those of the definition;
- float32 running buffers and logits on float64 input read in float64, a float64 layer on float32 input;
- the defaults of ``factor``, ``eps`` and ``sync``, the running update (BN term only, unbiased variance);
- synchronized training over a simulated world of two processes holding the same batch (a recorded all-reduce
  that doubles sums and counts): the BN term all-reduced over the given ``process_group``, the IN and LN terms
  local, the running variance with twice the count;
- the message of the set-size error (``N * S`` values per BN set).
"""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms.functional import switchable_norm

F64 = torch.float64
AFFINES = [(True, True), (True, False), (False, True), (False, False)]


def _batch(N=3, C=4, spatial=(2, 3), seed=0, dtype=F64):
    """``x (N, C, *spatial)`` with per-example and per-channel offsets, an affine away from 0 and 1, mixture
    logits of distinct weights and running statistics away from the batch's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *spatial, generator=g, dtype=F64) * 2
    x = x + torch.arange(C, dtype=F64).view(1, C, *[1] * len(spatial))
    x = x + torch.arange(N, dtype=F64).view(N, 1, *[1] * len(spatial)) * 0.5
    w = torch.rand(C, generator=g, dtype=F64) + 1.5
    b = torch.randn(C, generator=g, dtype=F64)
    mean_logits = torch.tensor([0.3, -0.5, 0.9], dtype=F64)
    var_logits = torch.tensor([-0.2, 0.7, 0.1], dtype=F64)
    rm = torch.randn(C, generator=g, dtype=F64)
    rv = torch.rand(C, generator=g, dtype=F64) + 0.5
    return tuple(t.to(dtype) for t in (x, w, b, mean_logits, var_logits, rm, rv))


def _moments(x):
    """The IN, LN and BN (batch) moments of ``x``, each ``(mean, biased var)`` broadcastable to ``(N, C, S)``."""
    x3 = x.double().reshape(x.shape[0], x.shape[1], -1)
    mu_in = x3.mean(2, keepdim=True)
    var_in = ((x3 - mu_in) ** 2).mean(2, keepdim=True)
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (var_in + (mu_in - mu_ln) ** 2).mean(1, keepdim=True)
    mu_bn = x3.mean((0, 2), keepdim=True)
    var_bn = ((x3 - mu_bn) ** 2).mean((0, 2), keepdim=True)
    return (mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn)


def reference(x, mean_logits, var_logits, rm, rv, w, b, eps, training):
    """The output by the definition (float64); in eval the BN term is ``(rm, rv)``."""
    N, C = x.shape[:2]
    (mu_in, var_in), (mu_ln, var_ln), (mu_bn, var_bn) = _moments(x)
    if not training:
        mu_bn, var_bn = rm.double().view(1, C, 1), rv.double().view(1, C, 1)
    wm, wv = torch.softmax(mean_logits.double(), 0), torch.softmax(var_logits.double(), 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (x.double().reshape(N, C, -1) - mu) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.double().view(1, C, 1)
    if b is not None:
        y = y + b.double().view(1, C, 1)
    return y.reshape(x.shape)


@pytest.mark.parametrize("spatial", [(), (5,), (2, 3)])
@pytest.mark.parametrize("has_weight, has_bias", AFFINES)
def test_eval_without_gradients_is_the_definition_with_running_bn_term(spatial, has_weight, has_bias):
    """Eval under ``no_grad`` (the affine folded into one native pass per ``(example, channel)``): IN and LN terms
    from the input, the BN term the running statistics, each of weight and bias applied when given; the running
    buffers are not changed, the output has the input's shape."""
    x, w, b, ml, vl, rm, rv = _batch(spatial=spatial, seed=1)
    w, b = (w if has_weight else None), (b if has_bias else None)
    rm0, rv0 = rm.clone(), rv.clone()
    with torch.no_grad():
        y = switchable_norm(x, ml, vl, rm, rv, w, b, False, eps=1e-3)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-3, False), rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("grad", [False, True])
def test_eval_reads_float32_buffers_and_logits_in_the_float64_input_dtype(grad):
    """A float32 layer (running buffers, logits, affine) on float64 input: the softmax of the logits and the
    running statistics are taken in float64 (a float32 softmax is off by about 1e-8), the output is float64."""
    x, *rest = _batch(seed=2)
    w, b, ml, vl, rm, rv = (t.float() for t in rest)
    rm[1] = 3e-8
    with torch.set_grad_enabled(grad):
        y = switchable_norm(x, ml, vl, rm, rv, w, b, False, eps=1e-3)
    assert y.dtype == F64
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-3, False), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("grad", [False, True])
def test_eval_of_a_float64_layer_on_float32_input_is_float32(grad):
    """A float64 layer on float32 input: statistics and output in float32, within float32 rounding of the
    definition."""
    x, w, b, ml, vl, rm, rv = _batch(seed=3)
    with torch.set_grad_enabled(grad):
        y = switchable_norm(x.float(), ml, vl, rm, rv, w, b, False, eps=1e-3)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, ml, vl, rm, rv, w, b, 1e-3, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial", [(), (2, 3)])
def test_eval_with_gradients_differentiates_the_mixture(spatial):
    """Eval with gradients enabled: the output and the gradients of a random upstream gradient into the input,
    weight, bias and both logits are those of the definition (the IN and LN terms depend on the input, the
    mixture on the logits; the running statistics are constants)."""
    x, w, b, ml, vl, rm, rv = _batch(spatial=spatial, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, ml, vl)]
    y = switchable_norm(leaves[0], leaves[3], leaves[4], rm, rv, leaves[1], leaves[2], False, eps=1e-3)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b, ml, vl)]
    xr, wr, br, mlr, vlr = ref_leaves
    y_ref = reference(xr, mlr, vlr, rm, rv, wr, br, 1e-3, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad(y, leaves, g)
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, g)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_training_defaults_are_momentum_0_1_and_eps_1e_5():
    """Without ``factor``/``eps``: ``eps = 1e-5`` in the output (variances near 1e-4); the running statistics get
    the BN term, ``0.1`` of the batch mean and of the unbiased batch variance (``n = N S``)."""
    x, w, b, ml, vl, rm, rv = _batch(seed=6)
    x = x * 5e-3
    rm0, rv0 = rm.clone(), rv.clone()
    y = switchable_norm(x, ml, vl, rm, rv, w, b, True)
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-5, True), rtol=1e-12, atol=1e-12)
    _, _, (mu_bn, var_bn) = _moments(x)
    n = 3 * 6
    torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * mu_bn.view(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * var_bn.view(-1) * n / (n - 1), rtol=1e-12, atol=1e-12)


def test_training_with_one_value_per_channel_per_example_counts_the_examples():
    """``(N, C)`` input with ``N = 2``, ``C = 1``: the BN set holds ``N * S = 2`` values (the channel count does
    not enter), so training is valid and is the definition (IN and LN terms of one value: ``x - x``)."""
    x = torch.tensor([[1.0], [3.0]], dtype=F64)
    ml, vl = torch.tensor([0.2, -0.1, 0.4], dtype=F64), torch.tensor([0.3, 0.0, -0.6], dtype=F64)
    rm, rv = torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    w, b = torch.tensor([1.5], dtype=F64), torch.tensor([0.25], dtype=F64)
    y = switchable_norm(x, ml, vl, rm, rv, w, b, True, factor=0.5, eps=1e-3)
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-3, True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, torch.tensor([0.5 + 0.5 * 2.0], dtype=F64), rtol=1e-12, atol=1e-12)


def test_a_batch_set_of_one_value_is_refused_in_training():
    """One example of ``(N, C)`` input: each BN set has ``N * S = 1`` value, refused naming the BN term and the
    fix (whatever the channel count)."""
    x, w, b, ml, vl, rm, rv = _batch(N=1, spatial=(), seed=7)
    message = (
        "SwitchableNorm input (BN term) has 1 element(s) per normalization set; a set needs more than 1 value "
        "(its variance is undefined). Use a batch with N * S > 1."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        switchable_norm(x, ml, vl, rm, rv, w, b, True)


@pytest.mark.parametrize("has_weight, has_bias", AFFINES)
def test_synchronized_batch_term_is_all_reduced_over_the_given_group(has_weight, has_bias, two_process_world):
    """``sync=True`` in training: two all-reduces (mean, then centred squares) for the BN term over
    ``process_group``, the IN and LN terms local; with the other process holding the same batch the output is the
    local definition (affine applied as given, float32 logits softmaxed in float64) and the running variance is
    updated with the union's count ``2 N S``."""
    group = object()
    x, w, b, _, _, rm, rv = _batch(seed=8)
    w, b = (w if has_weight else None), (b if has_bias else None)
    ml, vl = torch.tensor([0.3, -0.5, 0.9]), torch.tensor([-0.2, 0.7, 0.1])
    rm0, rv0 = rm.clone(), rv.clone()
    y = switchable_norm(x, ml, vl, rm, rv, w, b, True, factor=0.25, eps=1e-3, sync=True, process_group=group)
    assert two_process_world.groups == [group, group]
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-3, True), rtol=1e-12, atol=1e-12)
    _, _, (mu_bn, var_bn) = _moments(x)
    n = 2 * 3 * 6
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mu_bn.view(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * var_bn.view(-1) * n / (n - 1), rtol=1e-12, atol=1e-12)


def test_statistics_are_local_by_default_in_an_initialized_world(two_process_world):
    """``sync`` defaults to False: no all-reduce even with a process group up; the running variance is updated
    with the local count ``N S``."""
    x, w, b, ml, vl, rm, rv = _batch(seed=9)
    rv0 = rv.clone()
    y = switchable_norm(x, ml, vl, rm, rv, w, b, True, factor=0.5, eps=1e-3)
    assert two_process_world.groups == []
    torch.testing.assert_close(y, reference(x, ml, vl, rm, rv, w, b, 1e-3, True), rtol=1e-12, atol=1e-12)
    _, _, (_, var_bn) = _moments(x)
    n = 3 * 6
    torch.testing.assert_close(rv, 0.5 * rv0 + 0.5 * var_bn.view(-1) * n / (n - 1), rtol=1e-12, atol=1e-12)
