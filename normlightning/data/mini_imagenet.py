"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 class split) for few-shot learning.

100 ImageNet classes, 600 images each, 84x84: 64 base (training) classes, 16 validation
classes, 20 novel (test) classes. Two common on-disk layouts are read (``layout="auto"``
picks the one present, pickles first):

``csv`` (Ravi & Larochelle's split files)::

    root/images/<filename>               (or root/images/<label>/<filename>)
    root/split/{train,val,test}.csv      (or root/{train,val,test}.csv)
        header "filename,label", e.g. "n0153282900000005.jpg,n01532829"

Images of any size are resized to ``image_size`` x ``image_size``.

``pickle`` (the files of Gidaris & Komodakis 2018, also read by MetaOptNet)::

    root/miniImageNet_category_split_train_phase_train.pickle   (base classes, training images)
    root/miniImageNet_category_split_val.pickle                 (validation classes)
    root/miniImageNet_category_split_test.pickle                (novel classes)

each a pickled dict with ``data``: uint8 array ``(N, 84, 84, 3)`` and ``labels``: ``N`` ints
(Python 2 pickles, read with ``encoding="latin1"``). The ``*_train_phase_{val,test}`` files
(held-out images of the base classes) are not needed. The pickles are read by an unpickler that
builds only numpy arrays, dtypes and scalars, dicts, lists, numbers and strings: a file naming any
other type is refused with an :class:`~normlightning.safe_loading.UnsafeFileError` before
anything in it runs.

Training labels are the sorted base classes renumbered ``0 .. 63``; episodes relabel the
val/test classes themselves. Augmentation and episodes: see :mod:`normlightning.data.few_shot`.
"""

from __future__ import annotations

import csv
import os
import pickle
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from normlightning.data.base import Split
from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.few_shot import FewShotDataModule
from normlightning.data.rgb_images import load_rgb_image
from normlightning.safe_loading import UnsafeFileError, load_data_pickle

__all__ = ["MINI_IMAGENET_MEAN", "MINI_IMAGENET_STD", "PICKLE_FILES", "MiniImageNet"]

#: Per-channel pixel mean / std of miniImageNet's training images (the values of Gidaris & Komodakis' code, /255).
MINI_IMAGENET_MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
MINI_IMAGENET_STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)

#: Pickle file of each split (pickle layout).
PICKLE_FILES: dict[str, str] = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}

LAYOUTS = """  csv layout:
    <root>/images/<filename>.jpg            (or <root>/images/<label>/<filename>.jpg)
    <root>/split/train.csv, val.csv, test.csv  (or directly in <root>/), header "filename,label"
  pickle layout (Gidaris & Komodakis / MetaOptNet):
    <root>/miniImageNet_category_split_train_phase_train.pickle
    <root>/miniImageNet_category_split_val.pickle
    <root>/miniImageNet_category_split_test.pickle
    each a dict {"data": uint8 (N, 84, 84, 3), "labels": N ints}"""

HOW_TO_GET = (
    "build it from ImageNet with the Ravi & Larochelle split files (github.com/twitter-research/meta-learning-lstm, "
    "data/miniImagenet/{train,val,test}.csv) into <root>/images + <root>/split, or use the pickles distributed "
    "with github.com/gidariss/FewShotWithoutForgetting / github.com/kjunelee/MetaOptNet"
)


class _FileImages(Dataset):
    """Image files with labels: item ``(transform(RGB image resized to size x size), label)``."""

    def __init__(self, paths: list[str], labels: Tensor, size: int, transform: Any) -> None:
        self.paths, self.labels, self.size, self.transform = paths, labels, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        image = load_rgb_image(self.paths[i])
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return (self.transform(image) if self.transform else image), self.labels[i]


class _ArrayImages(Dataset):
    """uint8 images ``(N, H, W, 3)`` with labels: item ``(transform(images[i]), label)``."""

    def __init__(self, images: np.ndarray, labels: Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


class MiniImageNet(FewShotDataModule):
    """miniImageNet in either layout (see the module docstring).

    Args:
        root: the dataset folder.
        layout: ``"auto"`` (the pickle files if present, else the csv files), ``"csv"`` or ``"pickle"``.
        image_size: side of the (square) images fed to the model (84).
        num_base_classes: expected number of base classes (64); ``null``: whatever the training
            split holds (the pickle layout then loads the training pickle at construction).
        batch_size: base-class training examples per batch per process (256).
        num_workers, pin_memory: loader settings (8 workers, pinned memory).
        Other arguments: see :class:`~normlightning.data.few_shot.FewShotDataModule` (episodes,
            augmentation) and :class:`~normlightning.data.base.BaseDataModule`.

    Raises:
        DatasetNotFoundError: no layout found under ``root``, a file missing, or a malformed file;
            the message shows both expected layouts.
        UnsafeFileError: a pickle names a type outside numpy arrays and plain containers (the
            message names the file, the type and how to convert a trusted file).
    """

    def __init__(
        self,
        *,
        root: str = "data/miniimagenet",
        layout: Literal["auto", "csv", "pickle"] = "auto",
        image_size: int = 84,
        num_base_classes: int | None = 64,
        batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
        if layout not in ("auto", "csv", "pickle"):
            raise ValueError(f"MiniImageNet: layout must be 'auto', 'csv' or 'pickle', got {layout!r}")
        if image_size < 1:
            raise ValueError(f"MiniImageNet: image_size must be >= 1, got {image_size}")
        self.image_size = image_size
        self.layout = self._detect_layout(layout)
        self.input_shape = (3, image_size, image_size)
        self.mean, self.std = MINI_IMAGENET_MEAN, MINI_IMAGENET_STD
        self._class_order: dict[str, list[Any]] = {}
        if self.layout == "csv":
            base = self._read_csv("train")[2]
        elif num_base_classes is None:
            base = self._read_pickle("train")[2]
        else:
            base = list(range(num_base_classes))
        if num_base_classes is not None and len(base) != num_base_classes:
            self._missing(f"the training split has {len(base)} classes, expected num_base_classes={num_base_classes}")
        self.num_classes = len(base)

    # ----------------------------------------------------------------- errors / layout
    def _missing(self, problem: str) -> None:
        raise DatasetNotFoundError("MiniImageNet", self.root, LAYOUTS, HOW_TO_GET, problem)

    def _csv_path(self, split: str) -> str | None:
        for path in (os.path.join(self.root, "split", f"{split}.csv"), os.path.join(self.root, f"{split}.csv")):
            if os.path.isfile(path):
                return path
        return None

    def _detect_layout(self, layout: str) -> str:
        if not os.path.isdir(self.root):
            self._missing(f"no folder {self.root}")
        has_pickle = all(os.path.isfile(os.path.join(self.root, f)) for f in PICKLE_FILES.values())
        has_csv = all(self._csv_path(s) is not None for s in ("train", "val", "test")) and os.path.isdir(
            os.path.join(self.root, "images")
        )
        if layout == "pickle" or (layout == "auto" and has_pickle):
            missing = [f for f in PICKLE_FILES.values() if not os.path.isfile(os.path.join(self.root, f))]
            if missing:
                self._missing(f"layout=pickle but missing {missing}")
            return "pickle"
        if layout == "csv" or (layout == "auto" and has_csv):
            missing = [f"split/{s}.csv" for s in ("train", "val", "test") if self._csv_path(s) is None]
            if not os.path.isdir(os.path.join(self.root, "images")):
                missing.append("images/")
            if missing:
                self._missing(f"layout=csv but missing {missing}")
            return "csv"
        self._missing("found neither the csv layout nor the pickle layout")
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- readers
    def _read_csv(self, split: str) -> tuple[list[str], list[str], list[str]]:
        """``(image paths, label names, sorted class names)`` of one csv split; checks every file exists."""
        path = self._csv_path(split)
        assert path is not None
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
            self._missing(
                f"{path}: the first line must be the header 'filename,label', "
                f"got {rows[0] if rows else 'an empty file'}"
            )
        files, names = [], []
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                self._missing(f"{path} line {line}: expected 'filename,label', got {row}")
            files.append(row[0].strip())
            names.append(row[1].strip())
        if not files:
            self._missing(f"{path} lists no images")
        images = os.path.join(self.root, "images")
        paths, absent = [], []
        for name, label in zip(files, names, strict=True):
            flat, nested = os.path.join(images, name), os.path.join(images, label, name)
            found = flat if os.path.isfile(flat) else nested if os.path.isfile(nested) else None
            if found is None:
                absent.append(name)
            paths.append(found or flat)
        if absent:
            self._missing(f"{len(absent)} images listed in {path} are not in {images}/ (e.g. {absent[:3]})")
        return paths, names, sorted(set(names))

    def _read_pickle(self, split: str) -> tuple[np.ndarray, list[int], list[int]]:
        """``(uint8 images (N, H, W, 3), labels, sorted classes)`` of one pickle split, read without
        running code from the file (:func:`~normlightning.safe_loading.load_data_pickle`)."""
        path = os.path.join(self.root, PICKLE_FILES[split])
        try:
            content = load_data_pickle(path, what="MiniImageNet file")
        except UnsafeFileError:
            raise
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
            self._missing(f"cannot read {path}: {error}")
        if not isinstance(content, dict) or "data" not in content or "labels" not in content:
            keys = sorted(content) if isinstance(content, dict) else type(content).__name__
            self._missing(f"{path} must hold a dict with keys 'data' and 'labels', got {keys}")
        data, labels = np.asarray(content["data"]), [int(v) for v in content["labels"]]
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3 or len(labels) != len(data):
            self._missing(
                f"{path}: 'data' must be uint8 (N, H, W, 3) with one label each, got dtype {data.dtype}, "
                f"shape {data.shape}, {len(labels)} labels"
            )
        return data, labels, sorted(set(labels))

    # ----------------------------------------------------------------- FewShotDataModule API
    def build_split(self, split: Split, transform: Any) -> tuple[Dataset, Tensor]:
        if self.layout == "csv":
            paths, names, classes = self._read_csv(split)
            index = {c: i for i, c in enumerate(classes)}
            labels = torch.as_tensor([index[n] for n in names], dtype=torch.long)
            dataset: Dataset = _FileImages(paths, labels, self.image_size, transform)
        else:
            data, raw, classes = self._read_pickle(split)
            if data.shape[1:3] != (self.image_size, self.image_size):
                self._missing(
                    f"{PICKLE_FILES[split]} holds {data.shape[1]}x{data.shape[2]} images, "
                    f"image_size is {self.image_size}"
                )
            index = {c: i for i, c in enumerate(classes)}
            labels = torch.as_tensor([index[v] for v in raw], dtype=torch.long)
            dataset = _ArrayImages(data, labels, transform)
        if split == "train" and len(classes) != self.num_classes:
            self._missing(f"the training split has {len(classes)} classes, the model was built for {self.num_classes}")
        self._class_order[split] = list(classes)
        return dataset, labels
