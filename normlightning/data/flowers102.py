"""Oxford Flowers-102 through torchvision's ``Flowers102`` class, with its official splits.

On disk (the official files of https://www.robots.ox.ac.uk/~vgg/data/flowers/102/)::

    root/
      flowers-102/
        jpg/image_00001.jpg ... image_08189.jpg   (102flowers.tgz extracted)
        imagelabels.mat                           (labels 1..102 of every image)
        setid.mat                                 (trnid / valid / tstid: the official split)

102 classes; official split 1,020 train / 1,020 val / 6,149 test images. Training:
RandomResizedCrop ``image_size`` + flip; evaluation: resize + center crop (see
:mod:`.rgb_images`). ``val_fraction`` is not used: the dataset has its own validation split.
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset
from torchvision import datasets

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.image_folder import IMAGENET_MEAN, IMAGENET_STD
from normlightning.data.rgb_images import CroppedImageFiles, load_rgb_image, rgb_image_transform


class _Flowers102(datasets.Flowers102):
    """torchvision's Flowers102 whose ``.mat`` files are checked for presence, not md5."""

    _file_dict = {key: (name, None) for key, (name, _) in datasets.Flowers102._file_dict.items()}


class Flowers102(CroppedImageFiles, BaseDataModule):
    """Oxford Flowers-102 at ``image_size``, 102 classes, official train/val/test split.

    Args:
        image_size: side of the square crops.
        resize: short side before the evaluation center crop (default ``image_size * 256 / 224``).
        augment: RandomResizedCrop + flip on the training split (False: resize + center crop).
        batch_size: examples per batch **per process** (per GPU under DDP).
        num_workers: loader worker processes.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the folder
            containing ``flowers-102/``; ``val_fraction`` is not accepted: the dataset has its own
            validation split).
    """

    holdout_val_from_train = False
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"

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
        # val_fraction is fixed (and so left out of the CLI's arguments): the official split has a val set.
        super().__init__(batch_size=batch_size, num_workers=num_workers, val_fraction=0.0, **kwargs)
        self.image_size = image_size
        self.resize = resize
        self.augment = augment
        self.num_classes = 102
        self.input_shape = (3, image_size, image_size)
        self.mean = IMAGENET_MEAN
        self.std = IMAGENET_STD

    def _check_files(self) -> None:
        base = os.path.join(self.root, "flowers-102")
        missing = [p for p in ("jpg/", "imagelabels.mat", "setid.mat") if not os.path.exists(os.path.join(base, p))]
        if missing:
            raise DatasetNotFoundError(
                type(self).__name__,
                self.root,
                f"  {self.root}/\n    flowers-102/\n      jpg/image_00001.jpg ...\n"
                "      imagelabels.mat\n      setid.mat",
                f"download 102flowers.tgz, imagelabels.mat and setid.mat from {self.url}; extract the tgz "
                f"(it holds jpg/) into {base!r} and put the two .mat files next to jpg/",
                problem="missing " + ", ".join(os.path.join(base, p) for p in missing),
            )

    def build_dataset(self, split: Split) -> Dataset:
        self._check_files()
        transform = rgb_image_transform(split == "train", self.image_size, self.resize, self.augment)
        return _Flowers102(self.root, split=split, transform=transform, download=False, loader=load_rgb_image)
