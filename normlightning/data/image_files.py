"""Predicting on new images: every image file under a folder (``data.predict_root``), read recursively.

:func:`list_image_files` finds the files (extensions as ``torchvision.datasets.ImageFolder``:
``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``, any case; other files are skipped), in sorted
order of their paths relative to the folder. :class:`ImageFiles` reads them with the DataModule's
evaluation transform (:meth:`~normlightning.data.base.BaseDataModule.image_file_transform`): item
``i`` is the 1-tuple ``(transform(PIL image),)``, a float ``(C, H, W)`` tensor, without a label, and
``relative_paths[i]`` names its file (``/``-separated, relative to the folder), which the prediction
CSV writes in its ``path`` column. A file that cannot be read (truncated, not an image, an unsupported
mode: :func:`~normlightning.data.rgb_images.pil_to_rgb`) stops the prediction with an error naming
the folder and the file; ``data.unreadable_images=skip`` does not apply here, since a skipped file's
row would be written under another file's name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from normlightning.data.rgb_images import pil_to_rgb

__all__ = ["ImageFiles", "convert_mode", "list_image_files"]

SETTING = "data.predict_root"


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as 8-bit ``"RGB"`` (:func:`~normlightning.data.rgb_images.pil_to_rgb`, each PIL mode scaled
    by its range) or, ``mode="L"``, its grayscale ``L = (299 R + 587 G + 114 B) / 1000`` (PIL's conversion)."""
    rgb = pil_to_rgb(image)
    return rgb.convert("L") if mode == "L" else rgb


def list_image_files(root: str) -> tuple[list[str], int]:
    """``(image paths relative to root, sorted, '/'-separated; number of other files skipped)``.

    Raises:
        ValueError: ``root`` is not a folder, or holds no image file (the message names it).
    """
    if not os.path.isdir(root):
        raise ValueError(f"{SETTING}={root!r} is not a folder; set it to a folder of images to predict")
    found, skipped = [], 0
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in files:
            if name.lower().endswith(IMG_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
            else:
                skipped += 1
    if not found:
        raise ValueError(
            f"{SETTING}={root!r} holds no image file ({' '.join(IMG_EXTENSIONS)}) in it or its sub-folders "
            f"({skipped} other files); put the images to predict there, or point {SETTING} at their folder"
        )
    return sorted(found), skipped


class ImageFiles(Dataset):
    """The image files under ``root`` (see the module docstring), each through ``transform``.

    Args:
        root: the folder (``data.predict_root``), read recursively.
        transform: PIL image -> float tensor ``(C, H, W)``.
    """

    def __init__(self, root: str, transform: Callable[[Any], Tensor]) -> None:
        self.root = root
        self.transform = transform
        self.relative_paths, self.skipped = list_image_files(root)

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, index: int) -> tuple[Tensor]:
        relative = self.relative_paths[index]
        try:
            with Image.open(os.path.join(self.root, relative)) as image:
                image.load()
                return (self.transform(image),)
        except OSError as err:  # UnreadableImageError, PIL's UnidentifiedImageError, truncated files
            raise ValueError(
                f"{SETTING}={self.root!r}: cannot read {relative} as an image ({err}); remove or replace that file"
            ) from err
