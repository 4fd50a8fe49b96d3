"""BaseDataModule: what every normlightning DataModule shares.

A subclass sets ``num_classes``, ``input_shape`` ``(C, H, W)``, ``mean`` and ``std``
(per-channel tuples) in ``__init__`` (the CLI links them into the task right after
instantiation) and implements :meth:`BaseDataModule.build_dataset` for the splits
``"train"``, ``"val"``, ``"test"``. Images come out as float tensors in ``[0, 1]``: no
``Normalize`` in the data, the task normalizes with ``mean``/``std`` as its first module.

Predictions (``normlightning predict``) run over the test split, or, with ``predict_root``, over
every image file under that folder (:class:`~normlightning.data.image_files.ImageFiles`, read
with :meth:`BaseDataModule.image_file_transform`, the DataModule's evaluation transform).

Splits: datasets with only a train and a test set (MNIST, CIFAR) validate on the test set
by default (``val_fraction=0``, as the papers report); ``val_fraction > 0`` holds out a
seeded fraction of the training set instead (see :func:`split_indices`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from normlightning.data.image_files import ImageFiles, convert_mode
from normlightning.data.samplers import EpochSeededRandomSampler, seeded_loader_generator
from normlightning.data.unreadable import UNREADABLE_IMAGE_POLICIES, SkipUnreadableImages

Split = Literal["train", "val", "test"]


#: What a DataModule provides to normlightning's tasks (the CLI links them into the task) and the
#: injection: attribute -> what it is.
DATAMODULE_ATTRIBUTES: dict[str, str] = {
    "num_classes": "int, the number of classes (the task's num_classes)",
    "input_shape": "(C, H, W) of one example (the task's input_shape)",
    "batch_size": "int, examples per batch per process (norm `auto` group counts, linear LR scaling)",
    "mean": "optional per-channel tuple (the task's input_mean; default 0)",
    "std": "optional per-channel tuple (the task's input_std; default 1)",
    "class_names": "optional sequence of num_classes names (the name columns of the prediction CSV; default none)",
}


class MissingDataAttributeError(ValueError):
    """A task argument that the DataModule should have provided is unset."""


def missing_link_error(setting: str) -> MissingDataAttributeError:
    """The error for a task argument that no DataModule attribute filled (names every attribute)."""
    listed = "; ".join(f"{name}: {what}" for name, what in DATAMODULE_ATTRIBUTES.items())
    return MissingDataAttributeError(
        f"{setting} is not set: the data module does not provide it. A DataModule used with normlightning's "
        f"tasks must have the attributes {listed} (subclass normlightning.data.BaseDataModule, or set them in "
        f"your DataModule's __init__), or give the task's {setting} explicitly (--model.{setting}=...)."
    )


def split_indices(num_items: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Seeded random partition of ``range(num_items)`` into ``len(fractions) + 1`` parts.

    Part ``i < len(fractions)`` has ``round(fractions[i] * num_items)`` items; the last part
    gets the rest. The same ``seed`` always gives the same partition.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_items, generator=generator).tolist()
    parts, start = [], 0
    for fraction in fractions:
        size = round(fraction * num_items)
        parts.append(order[start : start + size])
        start += size
    parts.append(order[start:])
    return parts


class BaseDataModule(LightningDataModule):
    """Loaders for a dataset with train/val/test splits, ``batch_size`` examples per process.

    Args:
        root: folder holding the dataset files.
        batch_size: examples per batch **per process** (per GPU under DDP).
        eval_batch_size: batch size of the val/test/predict loaders (default: ``batch_size``).
        num_workers: loader worker processes.
        pin_memory: pin host memory (faster host-to-GPU copies); applied only when the run's device
            is a GPU (see :meth:`loader_pin_memory`).
        persistent_workers: keep workers alive between epochs (only with ``num_workers > 0``).
        val_fraction: fraction of the training set held out for validation (0: use the
            dataset's own validation/test split).
        seed: seed of the train/val split (independent of the global seed).
        drop_last: drop the last incomplete training batch (keeps batch statistics of
            batch-dependent normalizations on full batches); a training set (per process)
            smaller than ``batch_size`` is then an error at ``setup("fit")``.
        unreadable_images: an image file that cannot be read (truncated, not an image, a mode
            without a known scaling; data modules that read image files): ``error`` stops with an
            error naming the file; ``skip`` uses the next readable image of the split instead
            (batches keep their size), names each skipped file in a warning and reports their
            number at the end of the stage (:mod:`normlightning.data.unreadable`).
        shuffle_seed: seed of the training order: epoch ``e`` visits a permutation drawn from
            ``(shuffle_seed, e)`` (so a resumed run sees the same order); ``None``: the seed of
            ``seed_everything``.
        predict_root: a folder of images to predict (read recursively, every image file; see
            :mod:`normlightning.data.image_files`) instead of the test split.
    """

    #: ``val_fraction > 0`` carves the val split out of ``build_train_dataset`` (False: the
    #: subclass splits by itself in ``build_dataset``).
    holdout_val_from_train: bool = True

    #: Set by subclasses in ``__init__``.
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: Name of each class (index -> name), where the dataset has them; ``None``: none.
    class_names: Sequence[str] | None = None

    def __init__(
        self,
        *,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
        drop_last: bool = False,
        shuffle_seed: int | None = None,
        predict_root: str | None = None,
        unreadable_images: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1 or null, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if unreadable_images not in UNREADABLE_IMAGE_POLICIES:
            raise ValueError(f"unreadable_images must be one of {UNREADABLE_IMAGE_POLICIES}, got {unreadable_images!r}")
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.val_fraction = val_fraction
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_seed = shuffle_seed
        self.predict_root = predict_root
        self.unreadable_images = unreadable_images
        self.datasets: dict[str, Dataset] = {}

    # ----------------------------------------------------------------- datasets
    def build_dataset(self, split: Split) -> Dataset:
        """The dataset of one split with that split's transforms. Implemented by subclasses."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset(split)")

    def build_train_dataset(self, train: bool) -> Dataset:
        """The full training set with training (``train=True``) or evaluation transforms.

        Needed only when ``val_fraction > 0``; subclasses that support it implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support val_fraction > 0")

    def image_file_transform(self) -> v2.Compose:
        """Evaluation transform of one image file (a PIL image, any mode) -> float ``(C, H, W)`` in ``[0, 1]``
        of ``input_shape``: converted to grayscale (``C = 1``) or RGB (``C = 3``) and resized to ``(H, W)``.

        Datasets whose evaluation pipeline resizes and crops (ImageNet-style) override it with that pipeline.
        """
        channels, height, width = self.input_shape
        if channels not in (1, 3):
            raise ValueError(
                f"{type(self).__name__}: {channels}-channel inputs cannot be read from image files "
                f"(data.predict_root needs 1 or 3 channels)"
            )
        return v2.Compose(
            [
                v2.Lambda(functools.partial(convert_mode, mode="L" if channels == 1 else "RGB")),
                v2.ToImage(),
                v2.Resize((height, width), antialias=True),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    @property
    def predict_split(self) -> str:
        """The split ``predict`` runs over: ``"predict"`` (the files under ``predict_root``) or ``"test"``."""
        return "test" if self.predict_root is None else "predict"

    def _dataset(self, split: Split) -> Dataset:
        if split == "predict" and split not in self.datasets:
            files = ImageFiles(str(self.predict_root), self.image_file_transform())
            skipped = f" ({files.skipped} other files skipped)" if files.skipped else ""
            rank_zero_info(f"data.predict_root: predicting {len(files)} image files under {self.predict_root}{skipped}")
            self.datasets[split] = files
        if split not in self.datasets:
            if self.holdout_val_from_train and self.val_fraction > 0 and split in ("train", "val"):
                full = self.build_train_dataset(train=split == "train")
                val_idx, train_idx = split_indices(len(full), [self.val_fraction], self.seed)
                self.datasets[split] = Subset(full, train_idx if split == "train" else val_idx)
            else:
                self.datasets[split] = self.build_dataset(split)
            # (a split built from another split's dataset, e.g. test = val, is wrapped once)
            if self.unreadable_images == "skip" and not isinstance(self.datasets[split], SkipUnreadableImages):
                self.datasets[split] = SkipUnreadableImages(self.datasets[split], split)
        return self.datasets[split]

    def setup(self, stage: str) -> None:
        """Build the datasets the ``stage`` needs (``fit``, ``validate``, ``test``, ``predict``)."""
        splits: dict[str, tuple[Split, ...]] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self.predict_split,),
        }
        for split in splits[stage]:
            self._dataset(split)
        if stage == "fit":
            self._check_training_batches()

    def _check_training_batches(self) -> None:
        """With ``drop_last``, a training set (per process) smaller than ``batch_size`` yields no
        batch at all: Lightning would stop at once and the run would end without training."""
        if not self.drop_last:
            return
        try:
            num_examples = len(self.datasets["train"])
        except TypeError:  # an iterable dataset of unknown length
            return
        world_size = self.trainer.world_size if self.trainer is not None else 1
        per_process = math.ceil(num_examples / world_size)
        if per_process < self.batch_size:
            share = f" ({per_process} per process on {world_size} processes)" if world_size > 1 else ""
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the training set ({num_examples} examples{share}) "
                f"and data.drop_last is true, so there is no training batch. Set data.batch_size <= {per_process}, "
                f"or data.drop_last=false."
            )

    def teardown(self, stage: str) -> None:
        """With ``unreadable_images=skip``: warn how many images of each split were skipped."""
        for dataset in self.datasets.values():
            if isinstance(dataset, SkipUnreadableImages) and dataset.num_skipped:
                rank_zero_warn(f"data.unreadable_images=skip: {dataset.report()}")

    # ----------------------------------------------------------------- loaders
    def loader_pin_memory(self) -> bool:
        """``pin_memory`` for the loaders: the setting, but only when batches go to a GPU.

        Pinned memory only speeds up host-to-GPU copies; on a CPU-only run torch would warn that
        it is unused. The device is the trainer's (``trainer.strategy.root_device``); without a
        trainer, whether CUDA is available.
        """
        if not self.pin_memory:
            return False
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, split: Split, train: bool) -> DataLoader:
        dataset = self._dataset(split)
        generator = seeded_loader_generator(self.shuffle_seed)
        sampler = EpochSeededRandomSampler(dataset, self.shuffle_seed, loader_generator=generator) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=generator,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.loader_pin_memory(),
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        """Predictions run over the test split, or the image files under ``predict_root``."""
        return self._loader(self.predict_split, train=False)
