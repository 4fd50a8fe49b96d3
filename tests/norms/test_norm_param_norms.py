"""Weight standardization and weight normalization on conv / linear layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.norms import WSConv2d, apply_weight_norm, apply_weight_standardization


def _standardized(w, eps=1e-5):
    dims = tuple(range(1, w.dim()))
    m = w.mean(dim=dims, keepdim=True)
    v = ((w - m) ** 2).mean(dim=dims, keepdim=True)
    return (w - m) / torch.sqrt(v + eps)


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Conv2d(3, 5, 3), lambda: nn.Conv1d(3, 4, 2), lambda: nn.Conv3d(2, 3, 2), lambda: nn.Linear(6, 4)],
)
def test_weight_standardization_in_place(make):
    torch.manual_seed(0)
    m = make()
    raw = m.weight.detach().clone() * 3 + 1
    with torch.no_grad():
        m.weight.copy_(raw)
    out = apply_weight_standardization(m)
    assert out is m
    torch.testing.assert_close(m.weight, _standardized(raw))
    apply_weight_standardization(m)  # idempotent
    assert len(m.parametrizations.weight) == 1
    shapes = {nn.Conv2d: (3, 5, 5), nn.Conv1d: (3, 5), nn.Conv3d: (2, 3, 3, 3), nn.Linear: (6,)}
    x = torch.randn(2, *next(v for k, v in shapes.items() if isinstance(m, k)))
    m(x).sum().backward()
    assert m.parametrizations.weight.original.grad is not None


def test_wsconv2d_matches_reference():
    torch.manual_seed(1)
    conv = WSConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    ref = nn.functional.conv2d(x, _standardized(conv.weight), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref)


def test_weight_norm_in_place():
    torch.manual_seed(2)
    m = nn.Conv2d(3, 4, 3)
    w0 = m.weight.detach().clone()
    apply_weight_norm(m)
    apply_weight_norm(m)  # idempotent
    assert len(m.parametrizations.weight) == 1
    torch.testing.assert_close(m.weight, w0)  # g initialised to ||v||
    g = m.parametrizations.weight.original0
    v = m.parametrizations.weight.original1
    with torch.no_grad():
        g.mul_(2.0)
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(m.weight, expected)


def test_param_norm_type_errors():
    with pytest.raises(TypeError, match="nn.Conv1d/2d/3d or nn.Linear"):
        apply_weight_standardization(nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="nn.Conv1d/2d/3d or nn.Linear"):
        apply_weight_norm(nn.ReLU())
