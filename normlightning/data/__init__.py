"""DataModules: datasets on disk -> loaders of images in [0, 1] with a per-process batch size.

Every DataModule exposes ``num_classes``, ``input_shape`` ``(C, H, W)``, ``mean`` and ``std``
right after ``__init__``.
"""

from normlightning.data.base import BaseDataModule, split_indices
from normlightning.data.caltech256 import Caltech256
from normlightning.data.cifar import CIFAR10, CIFAR100
from normlightning.data.cub200 import CUB200
from normlightning.data.digits import Digits
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.few_shot import ClassSplitFewShotDataModule, FewShotDataModule
from normlightning.data.flowers102 import Flowers102
from normlightning.data.image_folder import ImageFolderDataModule, ImageNet
from normlightning.data.mini_imagenet import MiniImageNet
from normlightning.data.mnist import MNIST
from normlightning.data.mnist_subset import MNISTSubset
from normlightning.data.randaugment import RandAugmented
from normlightning.data.svhn import SVHN
from normlightning.data.synthetic import Synthetic, SyntheticDataset

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CUB200",
    "MNIST",
    "SVHN",
    "BaseDataModule",
    "Caltech256",
    "ClassSplitFewShotDataModule",
    "FewShotDataModule",
    "Flowers102",
    "MNISTSubset",
    "MiniImageNet",
    "RandAugmented",
    "DatasetNotFoundError",
    "Digits",
    "ImageFolderDataModule",
    "ImageNet",
    "Synthetic",
    "SyntheticDataset",
    "split_indices",
]
