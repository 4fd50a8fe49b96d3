"""``native_channel_affine`` (``normlightning.norms.functional.native``): ``gamma_c y + beta_c`` on ``y (N, C, *)``
as one native eval-mode batch-norm pass (docs/methods.md, "Shared conventions"), against the multiply-add written
out in float64, for each combination of a weight and a bias (issue 27, its mutation survivors)."""

from __future__ import annotations

import pytest
import torch

from normlightning.norms.functional.native import native_channel_affine

F64 = torch.float64


@pytest.mark.parametrize("with_weight, with_bias", [(True, True), (True, False), (False, True)])
def test_channel_affine_is_the_multiply_add(with_weight, with_bias):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, 5, generator=g, dtype=F64)
    weight = torch.rand(3, generator=g, dtype=F64) + 1.5 if with_weight else None
    bias = torch.rand(3, generator=g, dtype=F64) + 0.5 if with_bias else None
    expected = y.clone()
    if weight is not None:
        expected = expected * weight.view(1, 3, 1)
    if bias is not None:
        expected = expected + bias.view(1, 3, 1)
    torch.testing.assert_close(native_channel_affine(y, weight, bias), expected, rtol=1e-14, atol=1e-14)


def test_no_affine_returns_the_input_itself():
    y = torch.randn(4, 3, 5, dtype=F64)
    assert native_channel_affine(y, None, None) is y
