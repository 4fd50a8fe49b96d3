"""MNIST through ``torchvision.datasets.MNIST``: 28x28 grey digits, 60k train / 10k test."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import MNIST as TorchvisionMNIST

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.digits import DIGIT_CLASS_NAMES
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.transforms import to_tensor

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNIST(BaseDataModule):
    """MNIST, images ``(1, 28, 28)`` in ``[0, 1]``, no augmentation.

    Validation uses the test set unless ``val_fraction > 0`` (then a seeded part of the
    training set).

    Args:
        download: download into ``root`` in ``prepare_data`` (needs internet; default False).
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the folder
            containing ``MNIST/raw/``, torchvision's layout).
    """

    def __init__(self, *, download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.download = download
        self.num_classes = 10
        self.class_names = DIGIT_CLASS_NAMES
        self.input_shape = (1, 28, 28)
        self.mean = (0.1307,)
        self.std = (0.3081,)

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                TorchvisionMNIST(self.root, train=train, download=True)

    def _check_files(self) -> None:
        raw = os.path.join(self.root, "MNIST", "raw")
        missing = [name for name in MNIST_FILES if not os.path.isfile(os.path.join(raw, name))]
        if missing:
            raise DatasetNotFoundError(
                "MNIST",
                self.root,
                f"  {raw}/\n" + "".join(f"    {name}\n" for name in MNIST_FILES),
                "set data.download=true on a machine with internet access (torchvision downloads and unpacks "
                "the idx files), or copy the four unpacked idx files from http://yann.lecun.com/exdb/mnist/ there",
                problem="missing " + ", ".join(missing),
            )

    def _mnist(self, train: bool) -> Dataset:
        self._check_files()
        return TorchvisionMNIST(self.root, train=train, transform=to_tensor(), download=False)

    def build_dataset(self, split: Split) -> Dataset:
        return self._mnist(train=split == "train")

    def build_train_dataset(self, train: bool) -> Dataset:
        return self._mnist(train=True)
