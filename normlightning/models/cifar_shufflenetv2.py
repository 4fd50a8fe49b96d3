"""ShuffleNetV2 for 32x32 images (CIFAR), built on ``torchvision.models.ShuffleNetV2``.

Variant: the widely used CIFAR adaptation (as in kuangliu/pytorch-cifar) of torchvision's
ShuffleNetV2 (Ma et al. 2018) with the standard stage repeats (4, 8, 4) and torchvision's
channel table for the width multiplier:

    x0.5: 24, 48, 96, 192, 1024    x1.0: 24, 116, 232, 464, 1024
    x1.5: 24, 176, 352, 704, 1024  x2.0: 24, 244, 488, 976, 2048

Changes vs torchvision: the stem ``conv1`` is ``conv3x3(C_in -> 24, stride 1)-BN-ReLU``
(torchvision: stride 2) and the stem max-pool is removed (``maxpool = Identity``), so the total
downsampling is 8 instead of 32 and a 32x32 input reaches the last stage at 4x4 before
global average pooling. The blocks (torchvision's ``InvertedResidual`` with channel split
and shuffle), ``conv5`` and ``fc`` are torchvision's. The HN paper (Table 3) uses x1.5.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import ShuffleNetV2

__all__ = ["SHUFFLENET_V2_CHANNELS", "cifar_shufflenet_v2"]

#: torchvision's ``stages_out_channels`` per width multiplier.
SHUFFLENET_V2_CHANNELS: dict[float, list[int]] = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}


def cifar_shufflenet_v2(
    num_classes: int,
    input_shape: Sequence[int] = (3, 32, 32),
    width_mult: float = 1.5,
) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 (see the module docstring). ``(N, C, H, W) -> (N, num_classes)``."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
    key = float(width_mult)
    if key not in SHUFFLENET_V2_CHANNELS:
        raise ValueError(
            f"cifar_shufflenet_v2 width_mult must be one of {sorted(SHUFFLENET_V2_CHANNELS)}, got {width_mult}."
        )
    channels = SHUFFLENET_V2_CHANNELS[key]
    model = ShuffleNetV2([4, 8, 4], list(channels), num_classes=num_classes)
    model.conv1 = nn.Sequential(
        nn.Conv2d(int(input_shape[0]), channels[0], 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(channels[0]),
        nn.ReLU(inplace=True),
    )
    model.maxpool = nn.Identity()
    return model
