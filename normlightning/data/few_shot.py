"""Few-shot data: base-class training batches and seeded N-way K-shot episodes, on any labelled data.

A dataset is split by classes into base (training), validation and novel (test) classes;
:class:`FewShotDataModule` owns the episode protocol (``n_way``, shots, queries, episode counts and
seeds, with separate validation settings) and shards the episodes over DDP processes itself.
:class:`ClassSplitFewShotDataModule` splits any labelled data module by class lists. See
``docs/few_shot.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from normlightning.data.base import BaseDataModule, Split
from normlightning.data.episodes import EpisodeDataset

__all__ = [
    "ClassSplitFewShotDataModule",
    "FewShotDataModule",
    "RelabelledSubset",
    "dataset_labels",
    "few_shot_train_transform",
]


def few_shot_train_transform(
    size: tuple[int, int], padding: int = 8, color_jitter: float = 0.4, flip: bool = True, channels: int = 3
) -> v2.Compose:
    """The standard few-shot augmentation (Gidaris & Komodakis 2018; MetaOptNet).

    ``RandomCrop(size, padding)`` (zero padding), then ``ColorJitter(brightness=c, contrast=c,
    saturation=c)`` with ``c = color_jitter`` (saturation only for 3-channel images; ``c = 0``
    disables it), then a horizontal flip with probability 1/2 (``flip``). Input: a PIL image,
    an ``(H, W, C)`` uint8 array or a ``(C, H, W)`` tensor; output: float32 ``(C, H, W)`` in ``[0, 1]``.
    """
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if padding > 0:
        steps.append(v2.RandomCrop(size, padding=padding))
    if color_jitter > 0:
        steps.append(
            v2.ColorJitter(
                brightness=color_jitter, contrast=color_jitter, saturation=color_jitter if channels == 3 else 0
            )
        )
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def dataset_labels(dataset: Dataset) -> Tensor:
    """Integer label of every example of ``dataset`` as an int64 tensor ``(len(dataset),)``.

    Read without loading images where the dataset allows it: ``targets``/``labels``
    attributes, a ``TensorDataset``'s second tensor, ``Subset``/``ConcatDataset`` recursively;
    otherwise ``dataset[i][1]`` for every ``i``.
    """
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_labels(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().flatten()
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return torch.as_tensor(values).long().flatten()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


class RelabelledSubset(Dataset):
    """Examples ``indices`` of ``dataset`` with labels mapped by ``label_map`` and an optional transform.

    Item ``i``: ``(transform(image), label_map[label])`` for ``(image, label) = dataset[indices[i]]``.
    ``labels`` holds all new labels (int64 ``(len,)``), read without touching the images.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Sequence[int] | Tensor,
        labels: Tensor,
        label_map: dict[int, int] | None = None,
        transform: Any = None,
    ) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.label_map = label_map
        old = labels[self.indices]
        self.labels = torch.as_tensor([label_map[int(v)] for v in old], dtype=torch.long) if label_map else old.clone()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Tensor]:
        image, _ = self.dataset[int(self.indices[i])]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]


class FewShotDataModule(BaseDataModule):
    """Base-class training batches plus validation/test episodes (see the module docstring).

    Subclasses set ``num_classes`` (number of base classes), ``input_shape``, ``mean``, ``std``
    in ``__init__`` and implement :meth:`build_split`.

    Args:
        n_way: classes per episode ``N`` (5 in the papers).
        test_shots: the ``K`` values tested, one test loader each (default ``[1, 5]``).
        q_query: query examples per class ``Q`` (15 in the papers).
        test_episodes: episodes per ``K`` (600 in the papers).
        val_shot: ``K`` of the validation episodes.
        val_episodes: validation episodes per validation run (0: no validation).
        val_n_way: ``N`` of the validation episodes (``None``: ``n_way``; a validation split with
            fewer classes than ``n_way`` needs a smaller one).
        val_q_query: ``Q`` of the validation episodes (``None``: ``q_query``).
        episode_seed: seed of the episode sets (test: ``episode_seed``; validation: ``episode_seed + 1``).
            The same seed gives the same episodes, on any number of processes.
        augment: use the training augmentation (:func:`few_shot_train_transform`) on base batches.
        crop_padding, color_jitter, flip: its settings (padding 8, jitter 0.4, flip: the standard).
        batch_size: base-class training examples per batch per process.
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``eval_batch_size``
            and ``val_fraction`` are not accepted: an episode is one batch, and the validation
            classes are a split of their own).
    """

    holdout_val_from_train = False

    def __init__(
        self,
        *,
        n_way: int = 5,
        test_shots: Sequence[int] = (1, 5),
        q_query: int = 15,
        test_episodes: int = 600,
        val_shot: int = 5,
        val_episodes: int = 200,
        val_n_way: int | None = None,
        val_q_query: int | None = None,
        episode_seed: int = 0,
        augment: bool = True,
        crop_padding: int = 8,
        color_jitter: float = 0.4,
        flip: bool = True,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        # eval_batch_size and val_fraction are fixed (and so left out of the CLI's arguments).
        super().__init__(batch_size=batch_size, eval_batch_size=None, val_fraction=0.0, **kwargs)
        if self.unreadable_images == "skip":
            raise ValueError(
                f"{type(self).__name__}: data.unreadable_images=skip is not available for episodes (a skipped image "
                "would be replaced by one of another class); set data.unreadable_images=error and replace the file"
            )
        shots = [int(k) for k in test_shots]
        if n_way < 2:
            raise ValueError(f"n_way must be >= 2 (an episode needs at least two classes), got {n_way}")
        if not shots or min(shots) < 1 or len(set(shots)) != len(shots):
            raise ValueError(f"test_shots must be distinct positive ints, e.g. [1, 5]; got {list(test_shots)}")
        if q_query < 1:
            raise ValueError(f"q_query must be >= 1 (queries are what is scored), got {q_query}")
        if test_episodes < 2:
            raise ValueError(f"test_episodes must be >= 2 (the 95% interval needs two episodes), got {test_episodes}")
        if val_shot < 1 or val_episodes < 0:
            raise ValueError(f"need val_shot >= 1 and val_episodes >= 0, got {val_shot} and {val_episodes}")
        if val_n_way is not None and val_n_way < 2:
            raise ValueError(f"val_n_way must be >= 2 or null (= n_way), got {val_n_way}")
        if val_q_query is not None and val_q_query < 1:
            raise ValueError(f"val_q_query must be >= 1 or null (= q_query), got {val_q_query}")
        if crop_padding < 0 or color_jitter < 0:
            raise ValueError(f"crop_padding and color_jitter must be >= 0, got {crop_padding} and {color_jitter}")
        self.n_way, self.test_shots, self.q_query = n_way, shots, q_query
        self.test_episodes, self.val_shot, self.val_episodes = test_episodes, val_shot, val_episodes
        self.val_n_way = n_way if val_n_way is None else val_n_way
        self.val_q_query = q_query if val_q_query is None else val_q_query
        self.episode_seed = episode_seed
        self.augment, self.crop_padding, self.color_jitter, self.flip = augment, crop_padding, color_jitter, flip
        self.split_labels: dict[str, Tensor] = {}

    # ------------------------------------------------------------- subclass API
    def build_split(self, split: Split, transform: Any) -> tuple[Dataset, Tensor]:
        """Dataset of one class split and the label of each of its examples.

        Args:
            split: ``"train"`` (base classes, labels ``0 .. num_classes - 1``), ``"val"`` or
                ``"test"`` (any integer labels; episodes relabel them).
            transform: applied to every image; it returns a float ``(C, H, W)`` tensor in ``[0, 1]``.

        Returns:
            ``(dataset of (image, label), labels (len,) int64)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_split(split, transform)")

    def has_split(self, split: Split) -> bool:
        """Whether the split exists (override: e.g. no validation classes)."""
        return True

    # ------------------------------------------------------------- transforms
    def train_transform(self) -> Any:
        """Augmentation of base-class batches (identity conversion to ``[0, 1]`` floats with ``augment=False``)."""
        if not self.augment:
            return self.eval_transform()
        c, h, w = self.input_shape
        return few_shot_train_transform((h, w), self.crop_padding, self.color_jitter, self.flip, channels=c)

    def eval_transform(self) -> Any:
        """Episodes: conversion to float ``(C, H, W)`` in ``[0, 1]`` only."""
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    # ------------------------------------------------------------- datasets
    def build_dataset(self, split: Split) -> Dataset:
        dataset, labels = self.build_split(split, self.train_transform() if split == "train" else self.eval_transform())
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        size = len(dataset)
        if len(labels) != size:
            raise ValueError(f"{type(self).__name__}.build_split({split!r}): {len(labels)} labels for {size} examples")
        if split == "train" and len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"{type(self).__name__}: base-class labels must lie in 0..{self.num_classes - 1}, "
                f"got {int(labels.min())}..{int(labels.max())}"
            )
        self.split_labels[split] = labels
        return dataset

    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": (self.predict_split,)}
        for split in wanted[stage]:
            if split == "predict" or self.has_split(split):
                self._dataset(split)

    # ------------------------------------------------------------- loaders
    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def episode_loader(
        self, split: Split, k_shot: int, episodes: int, seed: int, n_way: int | None = None, q_query: int | None = None
    ) -> DataLoader:
        """A loader of ``episodes`` seeded ``n_way``-way ``k_shot``-shot episodes of ``split`` (this
        process's share); ``n_way``/``q_query`` default to the data module's."""
        dataset = self._dataset(split)
        num_replicas, rank = self._replicas()
        n_way = self.n_way if n_way is None else n_way
        q_query = self.q_query if q_query is None else q_query
        try:
            episode_set = EpisodeDataset(
                dataset, self.split_labels[split], n_way, k_shot, q_query, episodes, seed, num_replicas, rank
            )
        except ValueError as err:
            setting = "data.val_n_way" if split == "val" else "data.n_way"
            raise ValueError(f"{split} episodes: {err} (set {setting})") from err
        return DataLoader(
            episode_set,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.loader_pin_memory(),
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> Any:
        """``val_episodes`` episodes of ``val_shot`` shots on the validation classes (``[]``: no validation)."""
        if self.val_episodes == 0 or not self.has_split("val"):
            return []
        return self.episode_loader(
            "val",
            self.val_shot,
            self.val_episodes,
            self.episode_seed + 1,
            n_way=self.val_n_way,
            q_query=self.val_q_query,
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per ``K`` in ``test_shots``: ``test_episodes`` episodes on the novel classes."""
        return [self.episode_loader("test", k, self.test_episodes, self.episode_seed) for k in self.test_shots]


class ClassSplitFewShotDataModule(FewShotDataModule):
    """Few-shot learning on any labelled data module, split by class lists.

    All examples of ``source`` (its train, val and test splits together, each read once) are
    pooled; ``base_classes`` become the training classes (relabelled ``0 .. B-1`` in the given
    order), ``val_classes`` the validation episodes' classes (optional) and ``novel_classes``
    the test episodes' classes. ``num_classes``, ``input_shape``, ``mean`` and ``std`` come
    from ``source`` (``num_classes = len(base_classes)``). Example config (scikit-learn's digits)::

        data:
          class_path: normlightning.data.few_shot.ClassSplitFewShotDataModule
          init_args:
            source: {class_path: normlightning.data.Digits}
            base_classes: [0, 1, 2, 3, 4]
            novel_classes: [5, 6, 7, 8, 9]

    Args:
        source: a data module whose ``build_dataset(split)`` yields ``(image tensor in [0, 1], label)``
            (every normlightning data module does).
        base_classes, val_classes, novel_classes: disjoint lists of ``source`` labels.
        source_splits: which splits of ``source`` to pool.
        batch_size: base-class training examples per batch per process.
        Other arguments: see :class:`FewShotDataModule` (``root`` is not accepted: ``source`` reads the data).
    """

    def __init__(
        self,
        *,
        source: LightningDataModule,
        base_classes: Sequence[int],
        novel_classes: Sequence[int],
        val_classes: Sequence[int] | None = None,
        source_splits: Sequence[str] = ("train", "val", "test"),
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        # root is fixed (and so left out of the CLI's arguments): source reads the data.
        super().__init__(batch_size=batch_size, root="data", **kwargs)
        if not hasattr(source, "build_dataset"):
            raise TypeError(
                f"source must be a normlightning data module with build_dataset(split), got {type(source).__name__}"
            )
        sets = {
            "base_classes": list(base_classes),
            "novel_classes": list(novel_classes),
            "val_classes": list(val_classes or []),
        }
        for name, values in sets.items():
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has repeated classes: {values}")
        for a, b in (
            ("base_classes", "novel_classes"),
            ("base_classes", "val_classes"),
            ("val_classes", "novel_classes"),
        ):
            common = sorted(set(sets[a]) & set(sets[b]))
            if common:
                raise ValueError(f"{a} and {b} must be disjoint, both contain {common}")
        if not sets["base_classes"]:
            raise ValueError("base_classes must list at least one class")
        for name, setting, n_way in (
            ("novel_classes", "n_way", self.n_way),
            ("val_classes", "val_n_way", self.val_n_way),
        ):
            if sets[name] and len(sets[name]) < n_way:
                raise ValueError(
                    f"{name} has {len(sets[name])} classes, fewer than {setting}={n_way}; "
                    f"add classes or lower {setting}"
                )
        if not set(source_splits) <= {"train", "val", "test"} or not source_splits:
            raise ValueError(f"source_splits must be a non-empty subset of train, val, test; got {list(source_splits)}")
        self.source = source
        self.base_classes, self.novel_classes, self.val_classes = (
            sets["base_classes"],
            sets["novel_classes"],
            sets["val_classes"],
        )
        self.source_splits = list(source_splits)
        self.num_classes = len(self.base_classes)
        self.input_shape = tuple(source.input_shape)
        self.mean = tuple(source.mean)
        self.std = tuple(source.std)
        self._pool: tuple[Dataset, Tensor] | None = None

    def pooled(self) -> tuple[Dataset, Tensor]:
        """All examples of ``source_splits`` of ``source`` and their labels."""
        if self._pool is None:
            parts = [self.source.build_dataset(split) for split in self.source_splits]
            pool = ConcatDataset(parts)
            self._pool = (pool, dataset_labels(pool))
            present = set(self._pool[1].tolist())
            missing = sorted(set(self.base_classes + self.novel_classes + self.val_classes) - present)
            if missing:
                raise ValueError(
                    f"{type(self).__name__}: classes {missing} do not occur in {type(self.source).__name__} "
                    f"(its labels: {sorted(present)}); fix base_classes/val_classes/novel_classes"
                )
        return self._pool

    def has_split(self, split: Split) -> bool:
        return split != "val" or bool(self.val_classes)

    def build_split(self, split: Split, transform: Any) -> tuple[Dataset, Tensor]:
        pool, labels = self.pooled()
        classes = {"train": self.base_classes, "val": self.val_classes, "test": self.novel_classes}[split]
        mask = torch.isin(labels, torch.as_tensor(classes, dtype=torch.long))
        indices = torch.nonzero(mask).flatten()
        label_map = {c: i for i, c in enumerate(self.base_classes)} if split == "train" else None
        subset = RelabelledSubset(pool, indices, labels, label_map, transform)
        return subset, subset.labels
