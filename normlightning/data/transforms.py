"""Image transforms shared by the DataModules. Every pipeline ends in a float tensor in ``[0, 1]``
(no ``Normalize``: the task's first module normalizes)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def to_tensor() -> v2.Compose:
    """PIL image / uint8 array -> float32 tensor ``(C, H, W)`` in ``[0, 1]``."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def cifar_train(size: int = 32, padding: int = 4) -> v2.Compose:
    """CIFAR augmentation: zero-pad ``padding`` pixels on each side (``size + 2 * padding`` square), random
    ``size`` crop, horizontal flip."""
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"crop_padding must be an int >= 0 (pixels of zero padding per side), got {padding!r}")
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


#: How the evaluation pipeline resizes before its center crop: ``short_side`` (keep the aspect ratio,
#: short side = ``resize``) or ``square`` (both sides = ``resize``, the aspect ratio is not kept).
EVAL_RESIZE_MODES = ("short_side", "square")


def imagenet_eval(size: int = 224, resize: int | None = None, resize_mode: str = "short_side") -> v2.Compose:
    """ImageNet evaluation: resize to ``resize`` (default ``size * 256 / 224``), center crop ``size``.

    ``resize_mode``: ``short_side`` resizes the short side to ``resize`` (aspect ratio kept);
    ``square`` resizes the image to ``resize x resize`` (as the HN paper: "resized to 256x256").
    """
    if resize_mode not in EVAL_RESIZE_MODES:
        raise ValueError(f"eval_resize_mode must be one of {EVAL_RESIZE_MODES}, got {resize_mode!r}")
    resize = resize if resize is not None else round(size * 256 / 224)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize if resize_mode == "short_side" else [resize, resize], antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
