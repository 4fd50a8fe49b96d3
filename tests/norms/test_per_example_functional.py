"""norms/functional/per_example.py against float64 formulas written out here: default eps and training
flags, eps passed through, one-value sets, the shift below float64, and the exact error messages
(issue 27's mutation run)."""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms.functional import per_example as pe


def _gn_reference(x, groups, weight=None, bias=None, eps=1e-5):
    """``gamma_c (x - mu_ng) / sqrt(var_ng + eps) + beta_c`` in float64 over ``(C/G, S)`` (biased var)."""
    x = x.double()
    n, c = x.shape[0], x.shape[1]
    flat = x.reshape(n, groups, -1)
    mu = flat.mean(dim=2, keepdim=True)
    var = ((flat - mu) ** 2).mean(dim=2, keepdim=True)
    y = ((flat - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().view(shape)
    if bias is not None:
        y = y + bias.double().view(shape)
    return y


def _pn_reference(x, eps=1e-5):
    """Per ``(n, s)`` over ``C`` in float64."""
    x = x.double()
    mu = x.mean(dim=1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _tiny(*shape, seed=0):
    """float64 values of spread 1e-3, where eps = 1e-5 is not negligible against the variance."""
    return 1e-3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_default_eps_is_1e_5_everywhere():
    x = _tiny(2, 4, 3)
    _close(pe.group_norm(x, 2, None, None), _gn_reference(x, 2))
    _close(pe.flat_group_norm(x, 3, None, None), _gn_reference(x.reshape(2, 3, 4), 3).reshape(2, 4, 3))
    _close(pe.layer_norm(x, None, None), _gn_reference(x, 1))
    _close(pe.instance_norm(x, None, None), _gn_reference(x, 4))
    _close(pe.positional_norm(x, None, None), _pn_reference(x))


@pytest.mark.parametrize("spatial", [(1,), (3,)])
def test_eps_is_passed_to_the_kernel(spatial):
    x = torch.randn(2, 4, *spatial, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 0.5
    _close(pe.group_norm(x, 2, None, None, eps), _gn_reference(x, 2, eps=eps))
    _close(pe.layer_norm(x, None, None, eps), _gn_reference(x, 1, eps=eps))
    _close(pe.positional_norm(x, None, None, eps), _pn_reference(x, eps))
    _close(pe.flat_group_norm(x, 2, None, None, eps), _gn_reference(x, 2, eps=eps))
    if spatial != (1,):
        _close(pe.instance_norm(x, None, None, eps), _gn_reference(x, 4, eps=eps))


def test_default_training_flags():
    one = torch.randn(2, 1, 1, dtype=torch.float64)  # sets of one value: allowed at inference only
    bias = torch.tensor([0.7], dtype=torch.float64)
    _close(pe.flat_group_norm(one, 1, None, bias), bias.expand(2, 1).reshape(2, 1, 1))
    _close(pe.layer_norm(one, None, bias), bias.expand(2, 1).reshape(2, 1, 1))
    _close(pe.positional_norm(one, None, bias), bias.expand(2, 1).reshape(2, 1, 1))
    with pytest.raises(ValueError, match=re.escape("InstanceNorm input has 1 element(s) per normalization set")):
        pe.instance_norm(one, None, bias)  # training by default


def test_layer_norm_trains_on_two_values():
    x = torch.tensor([[1.0, 3.0], [0.0, -2.0]], dtype=torch.float64)
    _close(pe.layer_norm(x, None, None, training=True), _gn_reference(x, 1))


def test_group_norm_at_inference_with_as_many_channels_per_group_as_positions():
    x = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _close(pe.group_norm(x, 2, None, None), _gn_reference(x, 2))


def test_positional_norm_on_two_positions():
    x = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _close(pe.positional_norm(x, None, None), _pn_reference(x))


@pytest.mark.parametrize("norm", ["group", "flat"])
def test_one_value_sets_at_inference_give_the_bias_and_a_zero_weight_gradient(norm):
    x = torch.randn(2, 3, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.5, -0.5, 1.5], dtype=torch.float64, requires_grad=True)
    y = pe.group_norm(x, 3, weight, bias) if norm == "group" else pe.flat_group_norm(x, 3, weight, bias)
    _close(y, bias.detach().view(1, 3, 1).expand(2, 3, 1))
    y.sum().backward()
    assert weight.grad is not None
    _close(weight.grad, torch.zeros(3, dtype=torch.float64))
    _close(x.grad, torch.zeros_like(x))


def test_flat_group_norm_float32_far_from_zero():
    # mean 1e4, spread 1e-2: the shift by each set's first value keeps float32 accurate
    g = torch.Generator().manual_seed(4)
    x64 = 1e4 + 1e-2 * torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
    x = x64.float()
    y = pe.flat_group_norm(x, 3, None, None)
    torch.testing.assert_close(
        y.double(), _gn_reference(x.double().reshape(2, 3, 4), 3).reshape(2, 2, 6), rtol=1e-3, atol=1e-3
    )


def test_group_norm_error_names_the_valid_choices():
    msg = "GroupNorm num_groups=4 must divide the number of channels C=6; valid choices: [1, 2, 3, 6]."
    with pytest.raises(ValueError, match=re.escape(msg)):
        pe.group_norm(torch.zeros(1, 6, 2), 4, None, None)


def test_flat_group_norm_errors():
    msg = "FlatGroupNorm num_groups=5 must divide D = C*S = 3*4 = 12; valid choices (divisors of 12) near 5: "
    with pytest.raises(ValueError, match=re.escape(msg + "[1, 2, 3, 4, 6, 12].")):
        pe.flat_group_norm(torch.zeros(1, 3, 4), 5, None, None)
    # D = 720 has 30 divisors: the message lists the 12 closest to num_groups = 7
    msg = "valid choices (divisors of 720) near 7: [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16]."
    with pytest.raises(ValueError, match=re.escape(msg)):
        pe.flat_group_norm(torch.zeros(1, 3, 240), 7, None, None)
    msg = (
        "FlatGroupNorm with num_groups=12 on D=12 has 1 element(s) per normalization set; a set needs more than 1 "
        "value (its variance is undefined). Use fewer groups."
    )
    with pytest.raises(ValueError, match=re.escape(msg) + "$"):
        pe.flat_group_norm(torch.zeros(1, 3, 4), 12, None, None, training=True)


def test_group_and_instance_norm_set_size_errors():
    msg = (
        "GroupNorm with num_groups=3 on C=3 channels and S=1 position(s) has 1 element(s) per normalization set; "
        "a set needs more than 1 value (its variance is undefined). "
        "Use fewer groups (num_groups) or an input with more positions."
    )
    with pytest.raises(ValueError, match=re.escape(msg) + "$"):
        pe.group_norm(torch.zeros(2, 3, 1), 3, None, None, training=True)
    msg = (
        "InstanceNorm input has 1 element(s) per normalization set; a set needs more than 1 value "
        "(its variance is undefined). InstanceNorm needs a spatial size S > 1."
    )
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        pe.instance_norm(torch.zeros(2, 3, 1), None, None, training=True)


def test_layer_and_positional_norm_one_element_errors():
    msg = "LayerNorm: a set of one element (C * S == 1) in training; use C * S > 1."
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        pe.layer_norm(torch.zeros(2, 1, 1), None, None, training=True)
    msg = "PositionalNorm: a set of one element (C == 1) in training; PN normalizes over channels, use C > 1."
    with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
        pe.positional_norm(torch.zeros(2, 1, 3), None, None, training=True)
