"""Image transforms shared by the DataModules. Every pipeline ends in a float tensor in ``[0, 1]``
(no ``Normalize``: the task's first module normalizes)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def to_tensor() -> v2.Compose:
    """PIL image / uint8 array -> float32 tensor ``(C, H, W)`` in ``[0, 1]``."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def cifar_train(size: int = 32, padding: int = 4) -> v2.Compose:
    """CIFAR augmentation: zero-pad ``padding`` pixels, random ``size`` crop, horizontal flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomCrop(size, padding=padding),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def imagenet_train(size: int = 224) -> v2.Compose:
    """ImageNet augmentation: RandomResizedCrop ``size`` (scale 0.08-1) and horizontal flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def imagenet_eval(size: int = 224, resize: int | None = None) -> v2.Compose:
    """ImageNet evaluation: resize the short side to ``resize`` (default ``size * 256 / 224``), center crop ``size``."""
    resize = resize if resize is not None else round(size * 256 / 224)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
