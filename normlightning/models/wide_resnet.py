"""Wide Residual Networks (Zagoruyko & Komodakis, BMVC 2016), the CIFAR definition.

``WRN-d-k``: depth ``d = 6n + 4`` (``n`` blocks per group, 3 groups of 2 convolutions each,
plus the stem convolution and the classifier), widening factor ``k``.

Layout (input ``(N, C_in, H, W)``, e.g. 32x32 CIFAR)::

    conv3x3(C_in -> 16)                                   (N, 16,  H,   W)
    group 1: n blocks, 16  -> 16k, stride 1               (N, 16k, H,   W)
    group 2: n blocks, 16k -> 32k, stride 2 (first block) (N, 32k, H/2, W/2)
    group 3: n blocks, 32k -> 64k, stride 2 (first block) (N, 64k, H/4, W/4)
    BN -> ReLU -> global average pool -> Linear(64k -> num_classes)

Each block is pre-activation ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` with an identity
shortcut, or a 1x1 convolution shortcut (applied to the pre-activated input) when the
block changes width or stride. Convolutions have no bias. Norm layers are plain
``nn.BatchNorm2d`` so the norm-injection callback can swap them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "WideBasicBlock", "wide_resnet"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: ``BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3`` + shortcut.

    Args:
        in_planes: input channels.
        out_planes: output channels.
        stride: stride of the first 3x3 convolution (and of the 1x1 shortcut).
        dropout: dropout probability between the two convolutions.

    Shape: ``(N, in_planes, H, W) -> (N, out_planes, H/stride, W/stride)``.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        residual = x if self.shortcut is None else self.shortcut(pre)
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for small images (see the module docstring).

    Args:
        depth: total depth, must be ``6n + 4`` (10, 16, 22, 28, 34, 40, ...).
        widen_factor: ``k``; group widths are ``16k, 32k, 64k``.
        num_classes: number of output logits.
        in_channels: input image channels.
        dropout: dropout probability inside every block (0 disables it).

    Shape: ``(N, in_channels, H, W) -> (N, num_classes)``. ``features(x)`` returns the
    pooled ``(N, 64k)`` embedding before the classifier.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be of the form 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), "
                f"got depth={depth!r}."
            )
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be a positive integer, got {widen_factor!r}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth = depth
        self.widen_factor = widen_factor
        self.num_features = widths[3]

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, stride=1, dropout=dropout)
        self.block2 = self._group(widths[1], widths[2], n, stride=2, dropout=dropout)
        self.block3 = self._group(widths[2], widths[3], n, stride=2, dropout=dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self._init_weights()

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, 64k)`` pooled embedding."""
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def wide_resnet(
    num_classes: int,
    input_shape: Sequence[int] = (3, 32, 32),
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Backbone factory: ``WideResNet(depth, widen_factor, num_classes, input_shape[0], dropout)``.

    ``input_shape`` is ``(C, H, W)``; only ``C`` matters (the network pools globally).
    The BGN adversarial experiment uses ``depth=10, widen_factor=2``.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
    return WideResNet(depth, widen_factor, num_classes, in_channels=int(input_shape[0]), dropout=dropout)
