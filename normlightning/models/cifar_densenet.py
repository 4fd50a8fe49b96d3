"""DenseNet-121 for 32x32 images (CIFAR), built on ``torchvision.models.DenseNet``.

Variant: the widely used CIFAR adaptation (as in kuangliu/pytorch-cifar) of DenseNet-121
(Huang et al. 2017): growth rate 32, dense blocks (6, 12, 24, 16), bottleneck width
``4 * growth``, compression 0.5 in the transitions, 64 stem channels.

Changes vs torchvision's ``densenet121``: the stem ``conv0`` is ``conv3x3(C_in -> 64,
stride 1)`` (torchvision: 7x7 stride 2) and the stem ``norm0``, ``relu0`` and 3x3 max-pool
``pool0`` are removed (``Identity``; kuangliu's CIFAR DenseNet feeds the raw stem
convolution into the first dense block, whose layers begin with their own BN-ReLU).
Downsampling happens only in the three transitions (x8 instead of x32), so a 32x32 input
reaches the last dense block at 4x4 before ``norm5``-ReLU-global average pooling-``Linear``.
Dense layers, transitions and classifier are torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import DenseNet

__all__ = ["cifar_densenet121"]


def cifar_densenet121(num_classes: int, input_shape: Sequence[int] = (3, 32, 32)) -> DenseNet:
    """CIFAR DenseNet-121 (see the module docstring). ``(N, C, H, W) -> (N, num_classes)``."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
    model = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_classes)
    conv0 = nn.Conv2d(int(input_shape[0]), 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv0.weight)
    model.features.conv0 = conv0
    model.features.norm0 = nn.Identity()
    model.features.relu0 = nn.Identity()
    model.features.pool0 = nn.Identity()
    return model
