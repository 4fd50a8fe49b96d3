"""RandAugment (Cubuk et al. 2020) as a switch for any image DataModule.

:class:`RandAugmented` wraps a :class:`~normlightning.data.base.BaseDataModule` (CIFAR,
ImageNet, SVHN, Caltech-256, Flowers-102, CUB-200-2011, your own) and applies
``torchvision.transforms.v2.RandAugment(num_ops, magnitude)`` to every training image,
after the wrapped module's own training pipeline (crop, flip) and before the batch is formed;
validation, test and predict data are untouched. In a config::

    data:
      class_path: normlightning.data.randaugment.RandAugmented
      init_args:
        num_ops: 2            # N: operations applied per image
        magnitude: 9          # M: strength, 0 .. num_magnitude_bins - 1
        data:                 # the DataModule to augment, exactly as it would be written alone
          class_path: normlightning.data.CIFAR100
          init_args: {root: data, batch_size: 128}

The wrapper exposes the wrapped module's ``num_classes``, ``input_shape``, ``mean``, ``std``
and ``batch_size``, so the CLI links and the norm injection's ``auto`` group counts work as
without it. Images stay float tensors in ``[0, 1]`` (v2's RandAugment handles float images:
posterize/solarize/equalize act on the ``[0, 1]`` range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from normlightning.data.base import BaseDataModule


class RandAugmentDataset(Dataset):
    """``dataset[i] = (image, target, ...)`` -> ``(transform(image), target, ...)``."""

    def __init__(self, dataset: Dataset, transform: Any) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, *rest = self.dataset[index]
        return (self.transform(image), *rest)


class RandAugmented(LightningDataModule):
    """``data`` with RandAugment on its training images (see the module docstring).

    Args:
        data: the DataModule to wrap (a ``BaseDataModule``: it caches its datasets in ``datasets``).
        num_ops: number of random operations per image (RandAugment's ``N``), ``>= 1``.
        magnitude: their strength (``M``), ``0 <= magnitude < num_magnitude_bins``.
        num_magnitude_bins: number of magnitude levels (torchvision default 31).
    """

    def __init__(
        self, *, data: BaseDataModule, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31
    ) -> None:
        super().__init__()
        if not isinstance(data, BaseDataModule):
            raise TypeError(
                f"RandAugmented: data must be a normlightning BaseDataModule (CIFAR10, ImageNet, SVHN, ...), "
                f"got {type(data).__name__}"
            )
        if num_ops < 1:
            raise ValueError(f"RandAugmented: num_ops must be >= 1, got {num_ops}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(
                f"RandAugmented: magnitude must be in [0, num_magnitude_bins={num_magnitude_bins}), got {magnitude}"
            )
        self.data = data
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=num_magnitude_bins)
        self.num_classes = data.num_classes
        self.input_shape = data.input_shape
        self.mean = data.mean
        self.std = data.std

    @property
    def class_names(self) -> Sequence[str] | None:
        """The wrapped module's class names."""
        return self.data.class_names

    @property
    def batch_size(self) -> int:
        """The wrapped module's per-process batch size."""
        return self.data.batch_size

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str) -> None:
        self.data.setup(stage)
        train = self.data.datasets.get("train")
        if train is not None and not isinstance(train, RandAugmentDataset):
            self.data.datasets["train"] = RandAugmentDataset(train, self.transform)

    def train_dataloader(self) -> DataLoader:
        if not isinstance(self.data.datasets.get("train"), RandAugmentDataset):
            self.setup("fit")
        return self.data.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.data.predict_dataloader()
