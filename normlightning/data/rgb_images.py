"""Transforms for photo datasets stored as image files (Caltech-256, Flowers-102, CUB-200-2011).

Every image is first converted to RGB (:func:`pil_to_rgb`): grayscale (``L``), palette and
CMYK files become three channels (a grayscale value is copied to R, G and B, as the HN paper
does for Caltech-256). Then the ImageNet-style pipelines of
:mod:`normlightning.data.transforms`: training = RandomResizedCrop ``image_size`` (scale
0.08-1) + horizontal flip; evaluation = resize the short side to ``resize`` (default
``round(image_size * 256 / 224)``) + center crop ``image_size``. Output: float ``(3, S, S)``
in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from torchvision.transforms import v2

from normlightning.data.transforms import imagenet_eval, imagenet_train


def pil_to_rgb(image: Any) -> Any:
    """A PIL image in any mode -> the same image in mode ``RGB`` (other inputs unchanged)."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def rgb_image_transform(train: bool, image_size: int, resize: int | None = None, augment: bool = True) -> v2.Compose:
    """RGB conversion, then the training (``train and augment``) or evaluation pipeline at ``image_size``."""
    # training without augmentation gets the deterministic evaluation pipeline
    pipeline = imagenet_train(image_size) if train and augment else imagenet_eval(image_size, resize)
    return v2.Compose([v2.Lambda(pil_to_rgb), pipeline])


class CroppedImageFiles:
    """Mixin of a DataModule with ``image_size`` and ``resize``: image files to predict
    (``data.predict_root``) go through its evaluation pipeline, ``rgb_image_transform(train=False)``."""

    image_size: int
    resize: int | None

    def image_file_transform(self) -> v2.Compose:
        return rgb_image_transform(False, self.image_size, self.resize)


__all__ = ["CroppedImageFiles", "pil_to_rgb", "rgb_image_transform"]
