"""A tiny convolutional network for small images (the quickstart's 8x8 digits).

Layout for input ``(N, C, H, W)``::

    [conv3x3(C -> w) - BN - ReLU] - [conv3x3(w -> w) - BN - ReLU] - maxpool 2
    [conv3x3(w -> 2w) - BN - ReLU] - [conv3x3(2w -> 2w) - BN - ReLU] - global avg pool
    linear(2w -> num_classes)

All normalization layers are ``nn.BatchNorm2d`` (swappable by the norm injection).
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU blocks (width ``width``, then ``2 * width``) and a linear head.

    Args:
        in_channels: ``C`` of the input.
        num_classes: number of logits.
        width: channels of the first two convolutions.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"small_cnn: width must be >= 1, got {width}")
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            _conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> logits ``(N, num_classes)``; needs ``H, W >= 2``."""
        return self.classifier(self.features(x))


def small_cnn(num_classes: int, input_shape: tuple[int, int, int], width: int = 32) -> SmallCNN:
    """Registry factory for :class:`SmallCNN`."""
    if min(input_shape[1:]) < 2:
        raise ValueError(f"small_cnn needs H, W >= 2 (one 2x2 max-pool), got input_shape={input_shape}")
    return SmallCNN(input_shape[0], num_classes, width=width)
