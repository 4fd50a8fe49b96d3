"""The CIFAR ResNet-18 of the HN paper's CIFAR experiments: the registry's ``cifar_resnet18``.

The ImageNet ResNet-18 with a CIFAR stem: a 3x3 stride-1 convolution and no max-pool, so a
32x32 input keeps its resolution in the first stage. Four stages of two BasicBlocks with
64, 128, 256, 512 channels (stride 1, 2, 2, 2), global average pooling and a linear head
(:class:`~normlightning.models.cifar_resnet.CifarResNet`).
Output of stage ``k`` on a 32x32 input: ``(N, 64 * 2^k, 32 / 2^k, 32 / 2^k)``.

Every normalization layer is ``nn.BatchNorm2d`` (swappable by the norm injection).
"""

from __future__ import annotations

from normlightning.models.cifar_resnet import CifarResNet


def cifar_resnet18(num_classes: int, input_shape: tuple[int, int, int], base_width: int = 64) -> CifarResNet:
    """Registry factory: CIFAR ResNet-18 (BasicBlocks ``[2, 2, 2, 2]``, widths ``64..512``)."""
    return CifarResNet(input_shape[0], num_classes, (2, 2, 2, 2), base_width=base_width)
