"""CIFAR ResNets: :class:`CifarResNet` (BasicBlock stages after a 3x3 stride-1 stem, no max-pool) and the
registry's ``cifar_resnet``, He et al.'s (2016, §4.2) depth ``6n + 2`` nets (ResNet-8, 14, 20, 32, 56, ...).

Layout of ``cifar_resnet(depth=6n + 2)`` for input ``(N, C, H, W)``::

    conv3x3(C -> w) - BN - ReLU                              stem, stride 1
    stage 1: n BasicBlocks, w channels,  stride 1           (N, w,  H,   W)
    stage 2: n BasicBlocks, 2w channels, first stride 2      (N, 2w, H/2, W/2)
    stage 3: n BasicBlocks, 4w channels, first stride 2      (N, 4w, H/4, W/4)
    global average pool - linear(4w -> num_classes)

``depth = 6n + 2`` counts the stem, the ``2 * 3n`` convolutions of the blocks and the linear
head. He et al. use ``w = 16`` (ResNet-20: 0.27 M parameters); a smaller ``base_width``
gives the reduced-width nets of ``docs/reproduction.md``. In a BasicBlock a shape change takes a
projection shortcut (1x1 convolution + BN, He et al.'s option B). A 28x28 input (MNIST) gives 28, 14 and 7
pixels per side in the three stages; a 32x32 input gives 32, 16, 8.

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
        blocks_per_stage: BasicBlocks in each stage (``(2, 2, 2, 2)`` = ResNet-18,
            :mod:`normlightning.models.cifar_resnet18`; ``(n, n, n)`` = He et al.'s depth-``6n + 2`` nets,
            :func:`cifar_resnet`).
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


def cifar_resnet(
    num_classes: int, input_shape: tuple[int, int, int], depth: int = 20, base_width: int = 16
) -> CifarResNet:
    """Registry factory: the three-stage CIFAR ResNet of depth ``6n + 2`` (default ResNet-20,
    width 16): ``CifarResNet`` with ``n`` BasicBlocks per stage.

    Args:
        num_classes: number of logits.
        input_shape: ``(C, H, W)``; ``H, W >= 4`` (two stride-2 stages).
        depth: ``6n + 2`` with ``n >= 1`` (8, 14, 20, 26, 32, 44, 56, 110, ...).
        base_width: channels ``w`` of the stem and the first stage (``2w``, ``4w`` after).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}")
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise ValueError(f"cifar_resnet: base_width must be a positive int, got {base_width!r}")
    if min(input_shape[1:]) < 4:
        raise ValueError(f"cifar_resnet needs H, W >= 4 (two stride-2 stages), got input_shape={input_shape}")
    n = (depth - 2) // 6
    return CifarResNet(input_shape[0], num_classes, (n, n, n), base_width=base_width)
