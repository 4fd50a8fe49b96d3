"""DataModules: datasets on disk -> loaders of images in [0, 1] with a per-process batch size.

Every DataModule exposes ``num_classes``, ``input_shape`` ``(C, H, W)``, ``mean`` and ``std``
right after ``__init__``.
"""

from normlightning.data.base import BaseDataModule, split_indices
from normlightning.data.cifar import CIFAR10, CIFAR100
from normlightning.data.digits import Digits
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.image_folder import ImageFolderDataModule, ImageNet
from normlightning.data.mnist import MNIST
from normlightning.data.synthetic import Synthetic, SyntheticDataset

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "BaseDataModule",
    "DatasetNotFoundError",
    "Digits",
    "ImageFolderDataModule",
    "ImageNet",
    "Synthetic",
    "SyntheticDataset",
    "split_indices",
]
