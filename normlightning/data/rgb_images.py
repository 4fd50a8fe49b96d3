"""Image files -> 8-bit RGB images, and the transforms of photo datasets stored as files
(ImageFolder / ImageNet, Caltech-256, Flowers-102, CUB-200-2011, miniImageNet's image layout).

Every image is first converted to 8-bit RGB by :func:`pil_to_rgb`, scaling each PIL mode by
its own range (PIL's ``convert("RGB")`` would clip a 16-bit image to white):

* ``RGB``: unchanged. ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``: PIL's conversion
  (a grayscale value is copied to R, G and B, as the HN paper does for Caltech-256; a palette
  index becomes its palette colour).
* ``LA``, ``PA``, ``RGBA`` (and a palette with a transparent colour): the alpha channel is
  dropped, the stored colours are kept.
* ``I;16``, ``I;16B``, ``I;16L`` (16-bit grayscale, e.g. a 16-bit PNG) and ``I`` (32-bit
  integers, read as 16-bit values ``0..65535``): ``v8 = round(v * 255 / 65535)``.
* ``F`` (32-bit floats, read as ``0..1``): ``v8 = round(v * 255)``.

An ``I`` or ``F`` image outside that range, any other mode (``LAB``, ``HSV``, ...) and a file
that cannot be decoded (truncated, not an image) raise
:class:`~normlightning.data.errors.UnreadableImageError`, which names the file
(``data.unreadable_images=skip`` skips such files instead: :mod:`normlightning.data.unreadable`).

Then the ImageNet-style pipelines of :mod:`normlightning.data.transforms`: training =
RandomResizedCrop ``image_size`` (scale 0.08-1) + horizontal flip; evaluation = resize the short
side to ``resize`` (default ``round(image_size * 256 / 224)``) + center crop ``image_size``.
Output: float ``(3, S, S)`` in ``[0, 1]``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import v2

from normlightning.data.errors import UnreadableImageError, unreadable_image_error
from normlightning.data.transforms import imagenet_eval, imagenet_train

#: Modes that PIL converts to RGB correctly (``convert("RGB")``).
PIL_CONVERTED_MODES = ("1", "L", "P", "CMYK", "YCbCr", "RGBX")
#: Modes with an alpha channel, which is dropped.
ALPHA_MODES = ("LA", "PA", "RGBA")
#: 16-bit grayscale modes, and ``I`` whose values are read as 16-bit.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
FLOAT_MODE = "F"


def _gray_to_rgb(gray8: np.ndarray) -> Image.Image:
    return Image.fromarray(gray8.astype(np.uint8)).convert("RGB")  # a 2-D uint8 array is mode L


def _name(image: Image.Image) -> str:
    return getattr(image, "filename", "") or "an in-memory image"


def _scaled_to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``, ``I``) or float (``F``) grayscale image -> RGB, by the formulas above."""
    values = np.asarray(image)
    low, high = (0.0, 1.0) if image.mode == FLOAT_MODE else (0, 65535)
    if values.size and (not np.isfinite(values).all() or values.min() < low or values.max() > high):
        raise unreadable_image_error(
            _name(image),
            f"mode {image.mode} with values in [{values.min()}, {values.max()}], outside the range {low}..{high} "
            "that is read as black..white; convert the file to 8- or 16-bit grayscale",
        )
    if image.mode == FLOAT_MODE:
        return _gray_to_rgb(np.rint(values.astype(np.float64) * 255))
    return _gray_to_rgb((values.astype(np.int64) * 255 + 32767) // 65535)  # round(v * 255 / 65535), half up


def pil_to_rgb(image: Any) -> Any:
    """A PIL image in any supported mode -> the same image as 8-bit ``RGB`` (see the module
    docstring for each mode's scaling); other inputs (tensors, arrays) unchanged.

    A lazily opened file is decoded here: a file that cannot be decoded raises
    :class:`~normlightning.data.errors.UnreadableImageError` naming it.
    """
    if not isinstance(image, Image.Image):
        return image
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise unreadable_image_error(_name(image), f"{type(error).__name__}: {error}") from error
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES or mode == FLOAT_MODE:
        return _scaled_to_8_bit(image)
    if mode == "P" and "transparency" in image.info:  # PIL warns converting it straight to RGB
        return image.convert("RGBA").convert("RGB")
    if mode in PIL_CONVERTED_MODES or mode in ALPHA_MODES:
        return image.convert("RGB")
    raise unreadable_image_error(
        _name(image),
        f"mode {mode} is not read by normlightning (supported: RGB, {', '.join(PIL_CONVERTED_MODES + ALPHA_MODES)}, "
        f"{', '.join(SIXTEEN_BIT_MODES)}, {FLOAT_MODE}); convert the file to RGB",
    )


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Read the image file ``path`` as 8-bit RGB (:func:`pil_to_rgb`); a file that is missing,
    truncated or not an image raises :class:`~normlightning.data.errors.UnreadableImageError`
    naming ``path``."""
    try:
        with Image.open(path) as image:
            rgb = pil_to_rgb(image)
            return rgb.copy() if rgb is image else rgb
    except UnreadableImageError:
        raise
    except (OSError, ValueError, SyntaxError) as error:
        raise unreadable_image_error(os.fspath(path), f"{type(error).__name__}: {error}") from error


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


__all__ = ["CroppedImageFiles", "load_rgb_image", "pil_to_rgb", "rgb_image_transform"]
