"""The CIFAR ResNets of He et al. (2016, §4.2): depth ``6n + 2`` (ResNet-8, 14, 20, 32, 56, ...).

Layout for input ``(N, C, H, W)``::

    conv3x3(C -> w) - BN - ReLU                              stem, stride 1
    stage 1: n BasicBlocks, w channels,  stride 1           (N, w,  H,   W)
    stage 2: n BasicBlocks, 2w channels, first stride 2      (N, 2w, H/2, W/2)
    stage 3: n BasicBlocks, 4w channels, first stride 2      (N, 4w, H/4, W/4)
    global average pool - linear(4w -> num_classes)

``depth = 6n + 2`` counts the stem, the ``2 * 3n`` convolutions of the blocks and the linear
head. He et al. use ``w = 16`` (ResNet-20: 0.27 M parameters); a smaller ``base_width``
gives the reduced-width nets of ``docs/reproduction.md``. The BasicBlock is the one of
:mod:`normlightning.models.cifar_resnet`: a shape change takes a projection shortcut
(1x1 convolution + BN, He et al.'s option B). A 28x28 input (MNIST) gives 28, 14 and 7
pixels per side in the three stages; a 32x32 input gives 32, 16, 8.

Every normalization layer is ``nn.BatchNorm2d`` (swappable by the norm injection).
"""

from __future__ import annotations

from normlightning.models.cifar_resnet import CifarResNet


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
