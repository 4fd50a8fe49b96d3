"""small_cnn, cifar_resnet18 and mlp: shapes, structure, parameter counts, BatchNorm only."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from normlightning.models import build_backbone
from normlightning.models.input_normalization import InputNormalization


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (_NormBase, nn.GroupNorm, nn.LayerNorm))}


def test_small_cnn_shapes_and_norms() -> None:
    model = build_backbone("small_cnn", num_classes=10, input_shape=(1, 8, 8), width=4)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    assert _norm_types(model) == {nn.BatchNorm2d}
    # 4 conv (no bias) + 4 BN (2 params per channel) + linear
    expected = (1 * 4 * 9 + 4 * 4 * 9 + 4 * 8 * 9 + 8 * 8 * 9) + 2 * (4 + 4 + 8 + 8) + (8 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    with pytest.raises(ValueError, match="H, W >= 2"):
        build_backbone("small_cnn", num_classes=10, input_shape=(1, 1, 8))


def test_cifar_resnet18_is_the_standard_cifar_model() -> None:
    model = build_backbone("cifar_resnet18", num_classes=10, input_shape=(3, 32, 32))
    # the well-known size of the CIFAR ResNet-18 for 10 classes
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [2, 2, 2, 2]
    assert _norm_types(model) == {nn.BatchNorm2d}
    shapes = []
    hooks = [
        s.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
        for s in (model.layer1, model.layer2, model.layer3, model.layer4)
    ]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert shapes == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]


def test_mlp_is_four_layers_of_128_with_batchnorm1d() -> None:
    model = build_backbone("mlp", num_classes=10, input_shape=(1, 28, 28))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 128),
        (128, 128),
        (128, 128),
        (128, 128),
        (128, 10),
    ]
    assert _norm_types(model) == {nn.BatchNorm1d}
    assert [layer.bn.num_features for layer in model.layers] == [128] * 4
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    expected = 784 * 128 + 3 * 128 * 128 + 4 * 2 * 128 + 128 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    small = build_backbone("mlp", num_classes=3, input_shape=(2, 3, 3), depth=2, width=8)
    assert len(small.layers) == 2 and small(torch.rand(4, 2, 3, 3)).shape == (4, 3)


def test_input_normalization_formula_and_errors() -> None:
    norm = InputNormalization((0.5, 0.25), (0.5, 2.0))
    x = torch.rand(2, 2, 3, 3)
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    assert torch.allclose(norm(x), expected)
    assert dict(norm.named_buffers()).keys() == {"mean", "std"}
    with pytest.raises(ValueError, match="input_std must be > 0"):
        InputNormalization((0.0,), (0.0,))
    with pytest.raises(ValueError, match="equal length"):
        InputNormalization((0.0, 0.0), (1.0,))
    with pytest.raises(ValueError, match=r"\(N, 2, ...\)"):
        norm(torch.rand(2, 3, 4, 4))
