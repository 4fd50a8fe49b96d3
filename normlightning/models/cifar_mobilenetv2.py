"""MobileNetV2 for 32x32 images (CIFAR), built on ``torchvision.models.MobileNetV2``.

Variant: the widely used CIFAR adaptation (as in kuangliu/pytorch-cifar), i.e. torchvision's
MobileNetV2 with two changes so that a 32x32 image is not reduced to 1x1:

1. Stem: ``conv3x3(C_in -> _make_divisible(32 * width_mult, 8), stride 1)`` instead of stride 2 (``features[0]`` is
   rebuilt as a ``Conv2dNormActivation`` with BN + ReLU6, stride 1, ``C_in`` input channels).
2. The second inverted-residual stage (t=6, c=24, n=2) uses stride 1 instead of 2.

Total downsampling is therefore 8 instead of 32: a 32x32 input leaves the last stage at 4x4,
which is then globally average pooled. Everything else is torchvision's: the inverted
residual setting otherwise unchanged, width multiplier rounding to multiples of 8
(``_make_divisible``), the final 1x1 conv to ``max(1280, 1280 * width_mult)`` channels,
ReLU6, BatchNorm2d everywhere, torchvision's initialization. The classifier dropout
defaults to 0 here (torchvision: 0.2; kuangliu's CIFAR version has none).
The HN paper (Table 3) uses width multipliers 0.35 and 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import MobileNetV2
from torchvision.ops.misc import Conv2dNormActivation

__all__ = ["CIFAR_MOBILENET_V2_SETTING", "cifar_mobilenet_v2"]

#: (expansion t, output channels c, repeats n, first stride s); torchvision's ImageNet
#: setting except the second row's stride (2 -> 1).
CIFAR_MOBILENET_V2_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def cifar_mobilenet_v2(
    num_classes: int,
    input_shape: Sequence[int] = (3, 32, 32),
    width_mult: float = 1.0,
    dropout: float = 0.0,
) -> MobileNetV2:
    """CIFAR MobileNetV2 (see the module docstring). ``(N, C, H, W) -> (N, num_classes)``."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}.")
    model = MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=[list(row) for row in CIFAR_MOBILENET_V2_SETTING],
        norm_layer=nn.BatchNorm2d,
        dropout=dropout,
    )
    stem_out = model.features[0][0].out_channels
    stem = Conv2dNormActivation(
        int(input_shape[0]), stem_out, kernel_size=3, stride=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    nn.init.kaiming_normal_(stem[0].weight, mode="fan_out")
    model.features[0] = stem
    return model
