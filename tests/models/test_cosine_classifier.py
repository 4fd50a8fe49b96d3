"""Cosine classifier and weight imprinting against hand-computed values."""

import math

import pytest
import torch

from normlightning.models.cosine_classifier import CosineClassifier, imprint_weights


def test_cosine_classifier_formula():
    torch.manual_seed(0)
    clf = CosineClassifier(4, 3)
    assert float(clf.scale.detach()) == 10.0 and clf.scale.requires_grad
    x = torch.randn(5, 4)
    w = clf.weight.detach()
    expected = torch.empty(5, 3)
    for i in range(5):
        for j in range(3):
            expected[i, j] = 10.0 * torch.dot(x[i], w[j]) / (x[i].norm() * w[j].norm())
    torch.testing.assert_close(clf(x), expected)
    clf(x).sum().backward()
    assert clf.scale.grad is not None and clf.weight.grad is not None


def test_cosine_classifier_fixed_scale():
    clf = CosineClassifier(2, 2, scale=5.0, learn_scale=False)
    assert "scale" in dict(clf.named_buffers())
    assert all(name != "scale" for name, _ in clf.named_parameters())
    clf.weight.data = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(clf(torch.tensor([[3.0, 3.0]])), torch.tensor([[5 / math.sqrt(2), 5 / math.sqrt(2)]]))


def test_imprint_equals_hand_computed():
    feats = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [0.0, -5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: normalized (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9)
    c0 = torch.tensor([0.3, 0.9]) / math.sqrt(0.3**2 + 0.9**2)
    # class 1: (1, 0) and (0, -1) -> mean (0.5, -0.5) -> (1/sqrt2, -1/sqrt2)
    c1 = torch.tensor([1.0, -1.0]) / math.sqrt(2)
    torch.testing.assert_close(imprint_weights(feats, labels, 2), torch.stack([c0, c1]))


def test_imprint_errors():
    with pytest.raises(ValueError, match="no examples"):
        imprint_weights(torch.randn(2, 3), torch.tensor([0, 0]), 2)
    with pytest.raises(ValueError, match="0..1"):
        imprint_weights(torch.randn(2, 3), torch.tensor([0, 2]), 2)
