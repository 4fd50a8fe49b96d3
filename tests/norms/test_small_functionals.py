"""Contracts of the small functional modules that the mutation run (issue 27) found untested.

References are independent of the code under test: float64 formulas written out here and
``torch.maximum``'s own gradient. Modules: norms/functional/param_norms.py, cross_iteration_bn.py,
filter_response_norm.py.
"""

from __future__ import annotations

import torch

from normlightning.norms.functional.cross_iteration_bn import compensate, cross_iteration_statistics
from normlightning.norms.functional.filter_response_norm import filter_response_norm
from normlightning.norms.functional.param_norms import weight_standardize


def _past(mu, meanx2, c=2, dtype=torch.float64):
    """One past iteration whose derivatives are zero, so its compensated statistics are ``mu``/``meanx2``."""
    zeros = torch.zeros(c, 3, dtype=dtype)
    return (torch.tensor(mu, dtype=dtype), torch.tensor(meanx2, dtype=dtype), zeros, zeros, zeros)


def test_weight_standardize_default_eps_is_1e_5():
    # a weight of tiny spread, where eps dominates the variance: eps = 1e-5 is the documented default
    w = torch.tensor([[1e-3, -1e-3, 2e-3], [0.0, 4e-3, -4e-3]], dtype=torch.float64)
    mean = w.mean(dim=1, keepdim=True)
    var = ((w - mean) ** 2).mean(dim=1, keepdim=True)
    torch.testing.assert_close(weight_standardize(w), (w - mean) / torch.sqrt(var + 1e-5), rtol=1e-12, atol=0)


def test_weight_standardize_returns_the_weight_dtype():
    w = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = weight_standardize(w)
    assert out.dtype == torch.bfloat16
    w64 = w.double()
    mean = w64.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w64 - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.double(), (w64 - mean) / torch.sqrt(var + 1e-5), rtol=1e-2, atol=1e-2)


def test_compensate_keeps_the_history_dtype_for_a_wider_weight():
    # float32 history, float64 weight: the compensated statistics stay float32, the delta rounded to it
    past = tuple(t.float() for t in _past([1.0, 2.0], [3.0, 5.0]))
    dmu = torch.full((2, 3), 0.5)
    past = (past[0], past[1], dmu, dmu, past[4])
    weight = torch.full((2, 3), 1.0 + 1e-9, dtype=torch.float64)
    mu, meanx2 = compensate(past, weight, rho=1.0)
    assert mu.dtype == meanx2.dtype == torch.float32
    # delta = float32(1 + 1e-9) - 0 = 1 exactly; 3 entries of 0.5 * 1
    torch.testing.assert_close(mu, torch.tensor([2.5, 3.5]), rtol=0, atol=0)
    torch.testing.assert_close(meanx2, torch.tensor([4.5, 6.5]), rtol=0, atol=0)


def test_cross_iteration_statistics_in_the_current_dtype():
    mu = torch.tensor([1.0, 2.0])
    meanx2 = torch.tensor([2.0, 5.0])
    history = [_past([3.0, 0.0], [10.0, 1.0])]  # float64 history, float32 current statistics
    mean, var = cross_iteration_statistics(mu, meanx2, history, torch.zeros(2, 3), rho=1.0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(var, torch.tensor([6.0 - 4.0, 3.0 - 1.0]))


def test_cross_iteration_statistics_drops_a_past_with_negative_variance():
    mu = torch.tensor([1.0, 1.0], dtype=torch.float64)
    meanx2 = torch.tensor([2.0, 2.0], dtype=torch.float64)
    # channel 0: 1 - 4 < 0 is dropped; channel 1: 9 - 4 = 5 >= 0 counts
    history = [_past([2.0, 2.0], [1.0, 9.0])]
    mean, var = cross_iteration_statistics(mu, meanx2, history, torch.zeros(2, 3, dtype=torch.float64), rho=1.0)
    torch.testing.assert_close(mean, torch.tensor([1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([2.0 - 1.0, 5.5 - 2.25], dtype=torch.float64))


def test_cross_iteration_statistics_keeps_a_past_with_zero_variance():
    mu = torch.tensor([1.0, 1.0], dtype=torch.float64)
    meanx2 = torch.tensor([2.0, 2.0], dtype=torch.float64)
    history = [_past([2.0, 3.0], [4.0, 9.0])]  # variance exactly 0: counts (the rule is >= 0)
    mean, var = cross_iteration_statistics(mu, meanx2, history, torch.zeros(2, 3, dtype=torch.float64), rho=1.0)
    torch.testing.assert_close(mean, torch.tensor([1.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([3.0 - 2.25, 5.5 - 4.0], dtype=torch.float64))


def test_cross_iteration_statistics_always_counts_the_current_iteration():
    # the current statistics have negative variance (2 - 4 < 0) and still count; the past is valid
    mu = torch.tensor([2.0, 2.0], dtype=torch.float64)
    meanx2 = torch.tensor([2.0, 2.0], dtype=torch.float64)
    history = [_past([0.0, 1.0], [4.0, 3.0])]
    mean, var = cross_iteration_statistics(mu, meanx2, history, torch.zeros(2, 3, dtype=torch.float64), rho=1.0)
    torch.testing.assert_close(mean, torch.tensor([1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(var, torch.tensor([3.0 - 1.0, 2.5 - 2.25], dtype=torch.float64))
    # with an invalid past as well, only the current one counts (and the variance clamps at 0)
    history = [_past([3.0, 3.0], [1.0, 1.0])]
    mean, var = cross_iteration_statistics(mu, meanx2, history, torch.zeros(2, 3, dtype=torch.float64), rho=1.0)
    torch.testing.assert_close(mean, mu)
    torch.testing.assert_close(var, torch.zeros(2, dtype=torch.float64))


def _frn_reference(x, weight, bias, tau, eps):
    """FRN + TLU in float64: ``max(gamma · x / sqrt(mean_s x² + eps) + beta, tau)`` per (n, c)."""
    x = x.double()
    nu2 = x.flatten(2).square().mean(dim=2).view(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
    shape = (1, -1, *([1] * (x.dim() - 2)))
    y = weight.double().view(shape) * x / torch.sqrt(nu2 + eps) + bias.double().view(shape)
    return torch.maximum(y, tau.double().view(shape))


def test_filter_response_norm_without_grad_applies_weight_bias_and_tlu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    weight = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    bias = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    tau = torch.tensor([0.2, -0.1, 0.5], dtype=torch.float64)
    with torch.no_grad():
        z = filter_response_norm(x, weight, bias, tau, 1e-3)
    expected = _frn_reference(x, weight, bias, tau, 1e-3)
    assert (expected == tau.view(1, -1, 1, 1)).any()  # the TLU clips somewhere
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)


def test_filter_response_norm_takes_an_eps_tensor_of_another_dtype():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, generator=g)
    weight, bias, tau = torch.ones(3), torch.zeros(3), torch.full((3,), -0.3)
    eps = torch.tensor(0.5, dtype=torch.float64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            z = filter_response_norm(x, weight, bias, tau, eps)
        assert z.dtype == torch.float32
        torch.testing.assert_close(z.double(), _frn_reference(x, weight, bias, tau, 0.5), rtol=1e-6, atol=1e-6)


def test_filter_response_norm_tau_of_another_dtype_is_used_in_the_input_dtype():
    # weight 0 makes y = bias exactly; tau = 0.1 in float64 rounds to bias = float32(0.1): a tie, where
    # torch.maximum on float32 operands splits the gradient in half between y and tau
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    weight = torch.zeros(3)
    bias = torch.full((3,), 0.1, requires_grad=True)
    tau = torch.full((3,), 0.1, dtype=torch.float64, requires_grad=True)
    filter_response_norm(x, weight, bias, tau, 1e-6).sum().backward()

    bias_ref = bias.detach().clone().requires_grad_()
    tau_ref = tau.detach().float().requires_grad_()
    torch.maximum(bias_ref.view(1, -1, 1).expand(2, 3, 4), tau_ref.view(1, -1, 1)).sum().backward()
    torch.testing.assert_close(bias.grad, bias_ref.grad)
    torch.testing.assert_close(tau.grad, tau_ref.grad.double())
    torch.testing.assert_close(bias.grad, torch.full((3,), 4.0))  # half of 2 · 4 entries


def test_filter_response_norm_without_tlu_saves_no_pre_tlu_activation():
    x = torch.randn(2, 3, 4, requires_grad=True)
    z = filter_response_norm(x, torch.ones(3), torch.zeros(3), None, 1e-6)
    assert z.grad_fn.saved_tensors[3] is None
