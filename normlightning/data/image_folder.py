"""Image classification from class folders on disk: your own images, and ImageNet.

Layout (one sub-folder per class, any image files torchvision can read)::

    root/
      train/<class_a>/xxx.jpg, train/<class_b>/yyy.png, ...
      val/<class_a>/..., val/<class_b>/...      (optional with val_fraction > 0)
      test/<class_a>/...                         (optional; default: the val split)

Class indices follow the sorted folder names of ``train/`` (as ``torchvision.datasets.ImageFolder``).
Files are read as 8-bit RGB by :func:`~normlightning.data.rgb_images.load_rgb_image` (16-bit and
float images scaled to their range; an unreadable file named, or skipped with ``unreadable_images=skip``).
Training: RandomResizedCrop ``image_size`` + horizontal flip; evaluation: resize the short
side (``eval_resize_mode: square``: both sides) to ``round(image_size * 256 / 224)`` and center crop ``image_size``.
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.rgb_images import CroppedImageFiles, load_rgb_image
from normlightning.data.transforms import imagenet_eval, imagenet_train

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataModule(CroppedImageFiles, BaseDataModule):
    """Train on a folder of images sorted into one sub-folder per class.

    ``num_classes`` is the number of class folders in ``root/<train_dir>``, ``class_names`` their names (read in
    ``__init__``, so a missing folder fails early with the expected layout; fewer than 2 class
    folders is an error naming the folder).

    Args:
        train_dir: training split folder, relative to ``root``.
        val_dir: validation split folder, or ``None`` to hold out ``val_fraction`` of the training images.
        test_dir: test split folder (``None``: use the validation split).
        image_size: side of the square crops fed to the model.
        resize: side before the evaluation center crop (default ``round(image_size * 256 / 224)``).
        eval_resize_mode: ``short_side`` (resize the short side to ``resize``, aspect ratio kept) or
            ``square`` (resize to ``resize x resize``, as the HN paper's ImageNet evaluation).
        mean, std: per-channel statistics for the task's input normalization (default: ImageNet's).
        expected_num_classes: raise if ``train_dir`` has another number of class folders.
        batch_size: examples per batch **per process** (per GPU under DDP).
        num_workers: loader worker processes.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root``: the
            dataset folder; ``val_fraction > 0`` needs ``val_dir=None``).
    """

    dataset_name = "ImageFolderDataModule"
    how_to_get = (
        "put your images into one sub-folder per class under <root>/train (and <root>/val), "
        "or set data.val_dir=null and data.val_fraction=0.1 to hold out part of train/"
    )

    def __init__(
        self,
        *,
        train_dir: str = "train",
        val_dir: str | None = "val",
        test_dir: str | None = None,
        image_size: int = 224,
        resize: int | None = None,
        eval_resize_mode: str = "short_side",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        expected_num_classes: int | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, **kwargs)
        if val_dir is None and self.val_fraction == 0.0:
            raise ValueError(f"{type(self).__name__}: val_dir is null, so set val_fraction > 0 (e.g. 0.1)")
        if val_dir is not None and self.val_fraction > 0.0:
            raise ValueError(
                f"{type(self).__name__}: choose one validation source: val_dir={val_dir!r} or "
                f"val_fraction={self.val_fraction} (set the other to null / 0)"
            )
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.image_size = image_size
        self.resize = resize
        imagenet_eval(image_size, resize, eval_resize_mode)  # a bad mode fails here, naming the setting
        self.eval_resize_mode = eval_resize_mode
        self.classes = self._find_classes(train_dir)
        if len(self.classes) < 2:
            raise ValueError(
                f"{type(self).__name__}: {os.path.join(self.root, train_dir)} has {len(self.classes)} class folder "
                f"({', '.join(self.classes)}); classification needs at least 2 (one sub-folder per class: "
                f"{train_dir}/<class_a>/, {train_dir}/<class_b>/, ...). A single class trains a model that is always "
                f"right."
            )
        if expected_num_classes is not None and len(self.classes) != expected_num_classes:
            self._missing(f"{train_dir}/ has {len(self.classes)} class folders, expected {expected_num_classes}")
        self.num_classes = len(self.classes)
        self.class_names = self.classes
        self.input_shape = (3, image_size, image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def layout(self) -> str:
        lines = [f"  {self.root}/", f"    {self.train_dir}/<class_name>/<image>.jpg  (one folder per class)"]
        for folder in (self.val_dir, self.test_dir):
            if folder is not None:
                lines.append(f"    {folder}/<class_name>/<image>.jpg  (the same class folders)")
        return "\n".join(lines)

    def _missing(self, problem: str) -> None:
        raise DatasetNotFoundError(type(self).__name__, self.root, self.layout(), self.how_to_get, problem)

    def _find_classes(self, folder: str) -> list[str]:
        path = os.path.join(self.root, folder)
        if not os.path.isdir(path):
            self._missing(f"no folder {path}")
        try:
            classes, _ = find_classes(path)
        except FileNotFoundError:
            self._missing(f"no class sub-folders in {path}")
        return classes

    def _image_folder(self, folder: str, train: bool) -> Dataset:
        classes = self._find_classes(folder)
        if classes != self.classes:
            extra = sorted(set(classes) - set(self.classes))
            lacking = sorted(set(self.classes) - set(classes))
            self._missing(
                f"the class folders of {folder}/ differ from {self.train_dir}/: "
                f"missing {lacking[:5]}{'...' if len(lacking) > 5 else ''}, "
                f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        if train:
            transform = imagenet_train(self.image_size)
        else:
            transform = imagenet_eval(self.image_size, self.resize, self.eval_resize_mode)
        try:
            return ImageFolder(os.path.join(self.root, folder), transform=transform, loader=load_rgb_image)
        except FileNotFoundError as error:
            self._missing(f"{folder}/: {error}")
            raise  # unreachable, for type checkers

    def build_dataset(self, split: Split) -> Dataset:
        if split == "train":
            return self._image_folder(self.train_dir, train=True)
        folder = self.test_dir if split == "test" and self.test_dir is not None else self.val_dir
        if folder is None:  # test split without test_dir and without val_dir: the held-out part of train
            return self._dataset("val")
        return self._image_folder(folder, train=False)

    def build_train_dataset(self, train: bool) -> Dataset:
        return self._image_folder(self.train_dir, train=train)


class ImageNet(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC 2012) from ``root/train`` and ``root/val`` class folders.

    Same arguments as :class:`ImageFolderDataModule`, with ImageNet's defaults
    (``expected_num_classes=1000``, 224 crops).

    Args:
        root: the ImageNet folder (holding ``train/`` and ``val/``).
        expected_num_classes: raise if ``train/`` has another number of class folders (1000).
        num_workers, pin_memory, persistent_workers: loader settings (ImageNet's defaults: 8 workers,
            pinned memory, persistent workers).
        Other arguments: see :class:`ImageFolderDataModule` and
            :class:`~normlightning.data.base.BaseDataModule`.
    """

    how_to_get = (
        "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (registration "
        "needed); extract train/ so that each synset (n01440764, ...) is a folder of JPEGs; extract val/ and sort "
        "its 50,000 JPEGs into the same synset folders (e.g. with the valprep.sh script of the PyTorch ImageNet "
        "example, github.com/pytorch/examples/tree/main/imagenet)"
    )

    def __init__(
        self,
        *,
        root: str = "data/imagenet",
        expected_num_classes: int | None = 1000,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            root=root,
            expected_num_classes=expected_num_classes,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            **kwargs,
        )
