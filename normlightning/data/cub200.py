"""Caltech-UCSD Birds-200-2011 (CUB-200-2011) from its official on-disk layout.

On disk (``CUB_200_2011.tgz`` of https://www.vision.caltech.edu/datasets/cub_200_2011/
extracted under ``root``)::

    root/
      CUB_200_2011/
        images.txt               "<image_id> <relative path>"
                                 e.g. "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
        image_class_labels.txt   "<image_id> <class_id 1..200>"
        train_test_split.txt     "<image_id> <1 = train, 0 = test>"
        images/<relative path>

200 classes, 5,994 training and 5,794 test images (the official split). Labels are
``class_id - 1``. Validation is the test split unless ``val_fraction > 0`` holds out a seeded
fraction of the training images (Four Things: 25 %). Training: RandomResizedCrop
``image_size`` + flip; evaluation: resize + center crop (see :mod:`.rgb_images`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from normlightning.data.rgb_images import CroppedImageFiles, load_rgb_image, rgb_image_transform

METADATA = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def _read_table(path: str) -> dict[int, str]:
    """``"<id> <value>"`` lines -> ``{id: value}`` (the value may contain no spaces in CUB's files)."""
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}, line {number}: expected '<image_id> <value>', got {line.strip()!r}")
            table[int(parts[0])] = parts[1]
    return table


class CUB200Dataset(Dataset):
    """The images of one official CUB-200-2011 split: ``(transform(image), class_id - 1)``.

    Args:
        folder: the ``CUB_200_2011`` folder.
        train: the official training images (``is_train = 1``) or the test images.
        transform: applied to the PIL image.
    """

    def __init__(self, folder: str, train: bool, transform: Callable[[Any], Any] | None = None) -> None:
        paths, labels, is_train = (_read_table(os.path.join(folder, name)) for name in METADATA)
        if set(paths) != set(labels) or set(paths) != set(is_train):
            raise ValueError(
                f"{folder}: images.txt, image_class_labels.txt and train_test_split.txt list different image ids"
            )
        wanted = "1" if train else "0"
        ids = sorted(i for i in paths if is_train[i] == wanted)
        self.samples = [(os.path.join(folder, "images", paths[i]), int(labels[i]) - 1) for i in ids]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb_image(path)
        return (self.transform(image) if self.transform is not None else image), label


class CUB200(CroppedImageFiles, BaseDataModule):
    """CUB-200-2011 birds at ``image_size``, 200 classes, official train/test split.

    Args:
        image_size: side of the square crops.
        resize: short side before the evaluation center crop (default ``image_size * 256 / 224``).
        augment: RandomResizedCrop + flip on the training split (False: resize + center crop).
        batch_size: examples per batch **per process** (per GPU under DDP).
        num_workers: loader worker processes.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the folder
            containing ``CUB_200_2011/``).
    """

    url = "https://www.vision.caltech.edu/datasets/cub_200_2011/"

    def __init__(
        self,
        *,
        image_size: int = 224,
        resize: int | None = None,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.num_classes = 200
        self.input_shape = (3, image_size, image_size)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    @property
    def folder(self) -> str:
        return os.path.join(self.root, "CUB_200_2011")

    def _check_files(self) -> None:
        missing = [p for p in (*METADATA, "images") if not os.path.exists(os.path.join(self.folder, p))]
        if missing:
            raise DatasetNotFoundError(
                type(self).__name__,
                self.root,
                f"  {self.root}/\n    CUB_200_2011/\n"
                + "".join(f"      {name}\n" for name in METADATA)
                + "      images/<class folder>/<image>.jpg",
                f"download CUB_200_2011.tgz from {self.url} and extract it in {self.root!r} (tar xzf)",
                problem="missing " + ", ".join(os.path.join(self.folder, p) for p in missing),
            )

    def _cub(self, train_split: bool, augment: bool) -> Dataset:
        self._check_files()
        transform = rgb_image_transform(augment, self.image_size, self.resize, self.augment)
        return CUB200Dataset(self.folder, train=train_split, transform=transform)

    def build_train_dataset(self, train: bool) -> Dataset:
        return self._cub(train_split=True, augment=train)

    def build_dataset(self, split: Split) -> Dataset:
        if split == "train":
            return self._cub(train_split=True, augment=True)
        return self._cub(train_split=False, augment=False)
