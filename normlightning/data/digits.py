"""Digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

Images are ``(1, 8, 8)`` float tensors in ``[0, 1]`` (the 0..16 grey levels divided by 16).
The train/val/test split is a seeded random partition (:func:`~normlightning.data.base.split_indices`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from normlightning.data.base import BaseDataModule, Split, split_indices

#: Class names of the digit datasets (Digits, MNIST, SVHN): label ``d`` is the digit ``d``.
DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(10))


class Digits(BaseDataModule):
    """The quickstart dataset: ``sklearn.datasets.load_digits``, no download needed.

    Args:
        val_fraction: fraction of the 1797 images in the validation split.
        test_fraction: fraction in the test split; the rest is the training split.
        batch_size: examples per batch **per process** (per GPU under DDP).
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``seed``: seed of
            the split; ``root`` is unused).
    """

    holdout_val_from_train = False
    #: Mean and std of all 1797 images scaled to [0, 1] (computed once; checked by the tests).
    MEAN = (0.3053,)
    STD = (0.3760,)

    def __init__(
        self, *, val_fraction: float = 0.2, test_fraction: float = 0.2, batch_size: int = 64, **kwargs: Any
    ) -> None:
        super().__init__(val_fraction=val_fraction, batch_size=batch_size, **kwargs)
        if not 0.0 < test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"Digits needs 0 < test_fraction and val_fraction + test_fraction < 1, "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
        self.test_fraction = test_fraction
        self.num_classes = 10
        self.class_names = DIGIT_CLASS_NAMES
        self.input_shape = (1, 8, 8)
        self.mean = self.MEAN
        self.std = self.STD
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def load_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images ``(1797, 1, 8, 8)`` float32 in ``[0, 1]`` and labels ``(1797,)`` int64."""
        if self._tensors is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
            labels = torch.as_tensor(digits.target, dtype=torch.int64)
            self._tensors = (images, labels)
        return self._tensors

    def build_dataset(self, split: Split) -> Dataset:
        images, labels = self.load_tensors()
        val_idx, test_idx, train_idx = split_indices(len(labels), [self.val_fraction, self.test_fraction], self.seed)
        index = torch.as_tensor({"train": train_idx, "val": val_idx, "test": test_idx}[split])
        return TensorDataset(images[index], labels[index])
