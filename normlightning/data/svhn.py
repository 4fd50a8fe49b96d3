"""SVHN (Street View House Numbers, cropped digits) through torchvision's ``SVHN`` class.

On disk (the official ``.mat`` files of http://ufldl.stanford.edu/housenumbers/, "Format 2")::

    root/
      train_32x32.mat      73,257 digits
      test_32x32.mat       26,032 digits
      extra_32x32.mat     531,131 digits (only with use_extra=true)

Images ``(3, 32, 32)``, 10 classes (digit ``d`` has label ``d``; torchvision maps the
files' label 10 to 0). Training augmentation (``augment=true``): zero-pad 4 and random
crop 32, no flip (a flipped digit is another digit). Evaluation: none.

Splits: the test split is ``test_32x32.mat``. Validation is the test split unless
``val_fraction > 0`` holds out a seeded fraction of the training images (train, plus
extra with ``use_extra``). Four Things (Summers & Dinneen, ICLR 2020) pools train + extra
(604,388 images) and holds out 20 % for validation: ``use_extra: true, val_fraction: 0.2``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.digits import DIGIT_CLASS_NAMES
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.transforms import to_tensor

SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)


class _SVHN(datasets.SVHN):
    """torchvision's SVHN whose files are checked for presence, not md5 (hashing 1.3 GB per run)."""

    split_list = {split: [url, name, None] for split, (url, name, _) in datasets.SVHN.split_list.items()}


def svhn_train(size: int = 32, padding: int = 4) -> v2.Compose:
    """Digit augmentation: zero-pad ``padding`` pixels and random ``size`` crop (no flip)."""
    return v2.Compose([v2.ToImage(), v2.RandomCrop(size, padding=padding), v2.ToDtype(torch.float32, scale=True)])


class SVHN(BaseDataModule):
    """SVHN digits ``(3, 32, 32)``, 10 classes, from the official ``.mat`` files.

    Args:
        root: folder holding ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``).
        use_extra: add the 531,131 ``extra`` images to the training pool.
        augment: pad-4 random-crop augmentation of the training split (no flip).
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule`.
    """

    url = "http://ufldl.stanford.edu/housenumbers/"

    def __init__(
        self, *, root: str = "data/svhn", use_extra: bool = False, augment: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.use_extra = use_extra
        self.augment = augment
        self.num_classes = 10
        self.class_names = DIGIT_CLASS_NAMES
        self.input_shape = (3, 32, 32)
        self.mean = SVHN_MEAN
        self.std = SVHN_STD

    def _files(self) -> list[str]:
        return ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if self.use_extra else [])

    def _check_files(self) -> None:
        missing = [name for name in self._files() if not os.path.isfile(os.path.join(self.root, name))]
        if missing:
            raise DatasetNotFoundError(
                type(self).__name__,
                self.root,
                f"  {self.root}/\n" + "".join(f"    {name}\n" for name in self._files()),
                f"download the 'Format 2' cropped-digit files from {self.url} "
                f"({', '.join(self._files())}) into {self.root!r}",
                problem="missing " + ", ".join(missing),
            )

    def _svhn(self, split: str, augment: bool) -> Dataset:
        self._check_files()
        transform = svhn_train() if augment else to_tensor()
        return _SVHN(self.root, split=split, transform=transform, download=False)

    def build_train_dataset(self, train: bool) -> Dataset:
        augment = train and self.augment
        parts = [self._svhn("train", augment)] + ([self._svhn("extra", augment)] if self.use_extra else [])
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def build_dataset(self, split: Split) -> Dataset:
        if split == "train":
            return self.build_train_dataset(train=True)
        return self._svhn("test", augment=False)
