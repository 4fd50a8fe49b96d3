"""The CIFAR ResNet-18 (as in the HN paper's CIFAR experiments) and its building blocks.

The ImageNet ResNet-18 with a CIFAR stem: a 3x3 stride-1 convolution and no max-pool, so a
32x32 input keeps its resolution in the first stage. Four stages of two BasicBlocks with
64, 128, 256, 512 channels (stride 1, 2, 2, 2), global average pooling and a linear head.
Output of stage ``k`` on a 32x32 input: ``(N, 64 * 2^k, 32 / 2^k, 32 / 2^k)``.

Every normalization layer is ``nn.BatchNorm2d`` (swappable by the norm injection).
"""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; shortcut = 1x1 conv + BN on a shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks: a 3x3 stride-1 stem, then one stage per entry of
    ``blocks_per_stage`` (``layer1``, ``layer2``, ...; the first stride 1, the others 2), global
    average pooling and a linear head.

    Args:
        in_channels: ``C`` of the input.
        num_classes: number of logits.
        blocks_per_stage: BasicBlocks in each stage (``(2, 2, 2, 2)`` = ResNet-18; ``(n, n, n)``
            = He et al.'s depth-``6n + 2`` nets, :mod:`normlightning.models.cifar_resnet_depth`).
        base_width: channels of the stem and first stage (doubles per stage).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        base_width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        channels = base_width
        for index, num_blocks in enumerate(blocks_per_stage):
            out_channels = base_width * 2**index
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(BasicBlock(channels, out_channels, stride if block_index == 0 else 1))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stage_names = tuple(f"layer{index + 1}" for index in range(len(stages)))
        for name, stage in zip(self.stage_names, stages):
            self.add_module(name, stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet18(num_classes: int, input_shape: tuple[int, int, int], base_width: int = 64) -> CifarResNet:
    """Registry factory: CIFAR ResNet-18 (BasicBlocks ``[2, 2, 2, 2]``, widths ``64..512``)."""
    return CifarResNet(input_shape[0], num_classes, (2, 2, 2, 2), base_width=base_width)
