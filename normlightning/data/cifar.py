"""CIFAR-10 and CIFAR-100 through torchvision's dataset classes (the python pickle version).

Training augmentation: zero-pad ``crop_padding`` (default 4; the HN paper uses 2: "padded with 0 to
36x36"), random crop 32, horizontal flip. Evaluation: none.
Validation uses the test set unless ``val_fraction > 0``.

Files are checked for presence, not md5: torchvision hashes all ~170 MB on every
construction; here the archive is md5-checked once, when ``download=True`` fetches it.
The batch files are read without running code from them
(:func:`~normlightning.safe_loading.load_data_pickle`, where torchvision calls ``pickle.load``):
a file naming a type other than numpy arrays and plain containers is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.transforms import cifar_train, to_tensor
from normlightning.safe_loading import load_data_pickle


class _SafelyReadCIFAR(datasets.CIFAR10):
    """torchvision's CIFAR dataset with its pickles read by :func:`load_data_pickle` (its own
    ``__init__`` calls ``pickle.load``, which runs any code a file carries); same attributes:
    ``data`` uint8 ``(N, 32, 32, 3)``, ``targets``, ``classes``, ``class_to_idx``."""

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        download: bool = False,
    ) -> None:
        datasets.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        folder = os.path.join(self.root, self.base_folder)
        entries = [
            load_data_pickle(os.path.join(folder, name), what="CIFAR file")
            for name, _ in (self.train_list if train else self.test_list)
        ]
        self.data = np.vstack([entry["data"] for entry in entries]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [
            label for entry in entries for label in (entry["labels"] if "labels" in entry else entry["fine_labels"])
        ]
        self._load_meta()

    def _load_meta(self) -> None:
        meta = load_data_pickle(os.path.join(self.root, self.base_folder, self.meta["filename"]), what="CIFAR file")
        self.classes = meta[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


def _without_file_md5(cls: type[datasets.CIFAR10], name: str) -> type[datasets.CIFAR10]:
    """A subclass ``name`` of a torchvision CIFAR class whose extracted files are checked for presence only
    and read by :class:`_SafelyReadCIFAR`.

    ``name`` must be the module-level name it is bound to (so that it pickles).
    """
    return type(
        name,
        (_SafelyReadCIFAR, cls),
        {
            "train_list": [[name, None] for name, _ in cls.train_list],
            "test_list": [[name, None] for name, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
            "__doc__": f"torchvision's {cls.__name__}; extracted files are checked for presence, not md5.",
        },
    )


_CIFAR10 = _without_file_md5(datasets.CIFAR10, "_CIFAR10")
_CIFAR100 = _without_file_md5(datasets.CIFAR100, "_CIFAR100")


class CIFAR10(BaseDataModule):
    """CIFAR-10: 50k train / 10k test RGB images ``(3, 32, 32)``, 10 classes.

    Args:
        download: download into ``root`` in ``prepare_data`` (needs internet; default False).
        augment: pad-crop-flip augmentation of the training split.
        crop_padding: zero padding per side before the random 32 crop (default 4, i.e. 40x40; 2 gives 36x36).
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the folder
            containing ``cifar-10-batches-py/``, torchvision's layout).
    """

    dataset_class: type[datasets.CIFAR10] = _CIFAR10
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    num_classes_of_dataset = 10
    channel_mean = (0.4914, 0.4822, 0.4465)
    channel_std = (0.2470, 0.2435, 0.2616)

    def __init__(self, *, download: bool = False, augment: bool = True, crop_padding: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        cifar_train(padding=crop_padding)  # a bad padding fails here, naming the setting
        self.download = download
        self.augment = augment
        self.crop_padding = crop_padding
        self.num_classes = self.num_classes_of_dataset
        self.input_shape = (3, 32, 32)
        self.mean = self.channel_mean
        self.std = self.channel_std

    @property
    def class_names(self) -> list[str] | None:
        """The class names of the dataset's meta file (``None`` while the files are not there)."""
        cls = self.dataset_class
        path = os.path.join(self.root, cls.base_folder, cls.meta["filename"])
        if not os.path.isfile(path):
            return None
        return list(load_data_pickle(path, what="CIFAR file")[cls.meta["key"]])

    def prepare_data(self) -> None:
        if self.download:
            self.dataset_class(self.root, train=True, download=True)

    def _check_files(self) -> None:
        cls = self.dataset_class
        folder = os.path.join(self.root, cls.base_folder)
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise DatasetNotFoundError(
                type(self).__name__,
                self.root,
                f"  {folder}/\n" + "".join(f"    {name}\n" for name in names),
                f"set data.download=true on a machine with internet access, or download {self.archive_url} "
                f"and extract it in {self.root!r} (tar xzf)",
                problem="missing " + ", ".join(missing),
            )

    def _cifar(self, train: bool, augment: bool) -> Dataset:
        self._check_files()
        transform = cifar_train(padding=self.crop_padding) if augment else to_tensor()
        return self.dataset_class(self.root, train=train, transform=transform, download=False)

    def build_dataset(self, split: Split) -> Dataset:
        train = split == "train"
        return self._cifar(train=train, augment=train and self.augment)

    def build_train_dataset(self, train: bool) -> Dataset:
        return self._cifar(train=True, augment=train and self.augment)


class CIFAR100(CIFAR10):
    """CIFAR-100: 50k train / 10k test RGB images ``(3, 32, 32)``, 100 (fine) classes.

    Same arguments as :class:`CIFAR10`; ``root`` contains ``cifar-100-python/``.
    """

    dataset_class = _CIFAR100
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    num_classes_of_dataset = 100
    channel_mean = (0.5071, 0.4865, 0.4409)
    channel_std = (0.2673, 0.2564, 0.2762)
