"""Caltech-256 through torchvision's ``Caltech256`` class (no canonical split: one is drawn, seeded).

On disk (the official ``256_ObjectCategories.tar`` extracted under ``root/caltech256/``)::

    root/
      caltech256/
        256_ObjectCategories/
          001.ak47/001_0001.jpg, 001_0002.jpg, ...
          ...
          256.toad/256_0001.jpg, ...
          257.clutter/257_0001.jpg, ...     (the background class, left out by default)

256 object classes (30,607 images with the 827 clutter images). Grayscale and CMYK files
are converted to RGB (grayscale copied to three channels). Training: RandomResizedCrop
``image_size`` + flip; evaluation: resize + center crop (see :mod:`.rgb_images`).

Splits, drawn once from ``seed``:

* ``per_class_split: null`` (default): a random ``test_fraction`` of all images is the test
  split (HN paper: 80/20), the rest is training; validation = the test split, unless
  ``val_fraction > 0`` holds out that fraction of all images for validation.
* ``per_class_split: [n_train, n_val, n_test]``: that many images of every class (Four
  Things, Summers & Dinneen 2020: ``[40, 10, 30]``); a class with fewer images is an error.
  ``n_val = 0``: validation = the test split.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from normlightning.data.base import BaseDataModule, Split, split_indices
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from normlightning.data.rgb_images import CroppedImageFiles, load_rgb_image, rgb_image_transform

CLUTTER = "257.clutter"


class _Caltech256(datasets.Caltech256):
    """torchvision's ``Caltech256`` whose files are read by :func:`~normlightning.data.rgb_images.load_rgb_image`
    (torchvision opens them itself, and a truncated file then fails without its name)."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        label = self.y[index]
        name = f"{label + 1:03d}_{self.index[index]:04d}.jpg"  # torchvision's file naming
        image = load_rgb_image(os.path.join(self.root, "256_ObjectCategories", self.categories[label], name))
        return (self.transform(image) if self.transform is not None else image), label


class Caltech256(CroppedImageFiles, BaseDataModule):
    """Caltech-256 images at ``image_size``, 256 classes (257 with ``include_clutter``).

    Args:
        include_clutter: keep ``257.clutter`` as class 256.
        test_fraction: fraction of all images in the test split (without ``per_class_split``).
        per_class_split: ``[n_train, n_val, n_test]`` images per class instead of fractions.
        image_size: side of the square crops.
        resize: short side before the evaluation center crop (default ``image_size * 256 / 224``).
        augment: RandomResizedCrop + flip on the training split (False: resize + center crop).
        expected_num_classes: raise if another number of classes is found (``null``: no check).
        batch_size: examples per batch **per process** (per GPU under DDP).
        num_workers: loader worker processes.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the folder
            containing ``caltech256/256_ObjectCategories/``; ``val_fraction`` is a fraction of all
            images, drawn before the train split).
    """

    holdout_val_from_train = False
    archive = "https://data.caltech.edu/records/nyy15-4j048 (256_ObjectCategories.tar)"

    def __init__(
        self,
        *,
        include_clutter: bool = False,
        test_fraction: float = 0.2,
        per_class_split: tuple[int, int, int] | None = None,
        image_size: int = 224,
        resize: int | None = None,
        augment: bool = True,
        expected_num_classes: int | None = 256,
        batch_size: int = 64,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if per_class_split is None and not 0.0 < test_fraction < 1.0:
            raise ValueError(f"Caltech256: test_fraction must be in (0, 1), got {test_fraction}")
        if per_class_split is not None:
            counts = tuple(per_class_split)
            if (
                len(counts) != 3
                or any(not isinstance(c, int) or c < 0 for c in counts)
                or counts[0] < 1
                or counts[2] < 1
            ):
                raise ValueError(
                    "Caltech256: per_class_split must be [n_train >= 1, n_val >= 0, n_test >= 1], "
                    f"got {per_class_split}"
                )
            if self.val_fraction > 0:
                raise ValueError(
                    "Caltech256: with per_class_split set the validation size is its n_val; set val_fraction=0"
                )
            per_class_split = counts
        self.include_clutter = include_clutter
        self.test_fraction = test_fraction
        self.per_class_split = per_class_split
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.classes = self._find_classes()
        if expected_num_classes is not None and len(self.classes) != expected_num_classes:
            self._missing(f"found {len(self.classes)} classes, expected {expected_num_classes}")
        self.num_classes = len(self.classes)
        self.class_names = self.classes  # the folder names, e.g. 001.ak47
        self.input_shape = (3, image_size, image_size)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD
        self._split_index: dict[str, list[int]] | None = None

    @property
    def folder(self) -> str:
        return os.path.join(self.root, "caltech256", "256_ObjectCategories")

    def _missing(self, problem: str) -> None:
        layout = (
            f"  {self.root}/\n    caltech256/\n      256_ObjectCategories/\n"
            "        001.ak47/001_0001.jpg ...\n        ...\n        257.clutter/257_0001.jpg ..."
        )
        how = f"download {self.archive} and extract it with tar xf into {os.path.join(self.root, 'caltech256')!r}"
        raise DatasetNotFoundError(type(self).__name__, self.root, layout, how, problem)

    def _find_classes(self) -> list[str]:
        if not os.path.isdir(self.folder):
            self._missing(f"no folder {self.folder}")
        classes = sorted(e.name for e in os.scandir(self.folder) if e.is_dir())
        if not classes:
            self._missing(f"no class folders in {self.folder}")
        if not self.include_clutter and CLUTTER in classes:
            if classes[-1] != CLUTTER:  # labels stay 0..255 only if clutter sorts last, as in the official layout
                self._missing(f"{CLUTTER} is not the last class folder in sorted order")
            classes = classes[:-1]
        return classes

    def _torchvision(self, train: bool) -> datasets.Caltech256:
        transform = rgb_image_transform(train, self.image_size, self.resize, self.augment)
        return _Caltech256(self.root, transform=transform, download=False)

    def split_index(self) -> dict[str, list[int]]:
        """Indices into torchvision's ``Caltech256`` for ``train``, ``val`` and ``test`` (seeded, cached)."""
        if self._split_index is None:
            labels = self._torchvision(train=False).y
            kept = [i for i, y in enumerate(labels) if y < len(self.classes)]
            if self.per_class_split is None:
                test, val, train = split_indices(len(kept), [self.test_fraction, self.val_fraction], self.seed)
                index = {
                    "train": [kept[i] for i in train],
                    "val": [kept[i] for i in val],
                    "test": [kept[i] for i in test],
                }
            else:
                index = self._per_class(labels, kept)
            if not index["val"]:
                index["val"] = index["test"]
            self._split_index = index
        return self._split_index

    def _per_class(self, labels: list[int], kept: list[int]) -> dict[str, list[int]]:
        n_train, n_val, n_test = self.per_class_split
        by_class: dict[int, list[int]] = {}
        for i in kept:
            by_class.setdefault(labels[i], []).append(i)
        generator = torch.Generator().manual_seed(self.seed)
        index: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for label in sorted(by_class):
            items = by_class[label]
            if len(items) < n_train + n_val + n_test:
                raise ValueError(
                    f"Caltech256: class {self.classes[label]!r} has {len(items)} images, fewer than "
                    f"per_class_split={list(self.per_class_split)} needs ({n_train + n_val + n_test})"
                )
            order = [items[j] for j in torch.randperm(len(items), generator=generator).tolist()]
            index["train"] += order[:n_train]
            index["val"] += order[n_train : n_train + n_val]
            index["test"] += order[n_train + n_val : n_train + n_val + n_test]
        return index

    def build_dataset(self, split: Split) -> Dataset:
        return Subset(self._torchvision(train=split == "train"), self.split_index()[split])
