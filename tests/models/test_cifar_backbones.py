"""CIFAR MobileNetV2 / ShuffleNetV2 / DenseNet121: 32x32 forward and 8x total downsampling."""

import pytest
import torch
from torch import nn

from normlightning.models.cifar_densenet import cifar_densenet121
from normlightning.models.cifar_mobilenetv2 import cifar_mobilenet_v2
from normlightning.models.cifar_shufflenetv2 import cifar_shufflenet_v2


def _last_map_and_logits(model: nn.Module, last: nn.Module, x: torch.Tensor):
    seen = {}
    handle = last.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    logits = model(x)
    handle.remove()
    return seen["out"], logits


@pytest.mark.parametrize("width,stem", [(0.35, 16), (1.0, 32)])
def test_cifar_mobilenet_v2(width, stem):
    model = cifar_mobilenet_v2(10, (3, 32, 32), width_mult=width)
    assert model.features[0][0].stride == (1, 1) and model.features[0][0].out_channels == stem
    fmap, logits = _last_map_and_logits(model, model.features, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert fmap.shape == (2, 1280, 4, 4)  # 32 / 8


def test_cifar_shufflenet_v2():
    model = cifar_shufflenet_v2(10, (3, 32, 32), width_mult=1.5)
    assert isinstance(model.maxpool, nn.Identity)
    fmap, logits = _last_map_and_logits(model, model.conv5, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert fmap.shape == (2, 1024, 4, 4)
    assert model.stage2[0].branch1[0].in_channels == 24 and model.stage4[-1].branch2[-3].out_channels == 352


def test_cifar_densenet121():
    model = cifar_densenet121(10, (3, 32, 32))
    fmap, logits = _last_map_and_logits(model, model.features, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    # 64 + 16*32 growth after the last block's input of 512 channels -> 1024, 4x4
    assert fmap.shape == (2, 1024, 4, 4)


def test_cifar_backbones_grayscale_and_bad_width():
    assert cifar_mobilenet_v2(3, (1, 32, 32), 0.35).features[0][0].in_channels == 1
    with pytest.raises(ValueError, match="width_mult"):
        cifar_shufflenet_v2(10, (3, 32, 32), width_mult=0.7)
    for m in (
        cifar_mobilenet_v2(3, (3, 32, 32), 0.35),
        cifar_shufflenet_v2(3, (3, 32, 32)),
        cifar_densenet121(3, (3, 32, 32)),
    ):
        assert not any(isinstance(x, (nn.GroupNorm, nn.LayerNorm)) for x in m.modules())
        assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
