"""Synthetic images of any shape with a learnable class signal, for tests and smoke runs.

Example ``i`` of a split is generated on the fly from a generator seeded with
``(seed, split, i)``: label ``y`` uniform in ``[0, num_classes)``, image
``x = clamp(prototype[y] + noise_std * z, 0, 1)`` with ``z`` standard normal and
``prototype[y]`` a fixed per-class pattern (uniform in ``[0.2, 0.8]`` on a coarse
``(C, 4, 4)`` grid, upsampled to ``(H, W)`` by nearest neighbour). So a model can learn it
(accuracy well above chance after a few steps), nothing is stored, and any size works.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from normlightning.data.base import BaseDataModule, Split

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class SyntheticDataset(Dataset):
    """``length`` examples ``(image (C, H, W) float32 in [0, 1], label int64)``, deterministic per index."""

    def __init__(
        self,
        length: int,
        input_shape: tuple[int, int, int],
        num_classes: int,
        noise_std: float,
        seed: int,
        split_id: int,
    ) -> None:
        self.length = length
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.noise_std = noise_std
        self.base_seed = (seed * 3 + split_id) * 1_000_003
        generator = torch.Generator().manual_seed(seed)
        channels, height, width = input_shape
        grid = 0.2 + 0.6 * torch.rand(num_classes, channels, 4, 4, generator=generator)
        self.prototypes = F.interpolate(grid, size=(height, width), mode="nearest")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} examples")
        generator = torch.Generator().manual_seed(self.base_seed + index)
        label = torch.randint(self.num_classes, (), generator=generator)
        noise = torch.randn(self.input_shape, generator=generator)
        image = (self.prototypes[label] + self.noise_std * noise).clamp(0.0, 1.0)
        return image, label


class Synthetic(BaseDataModule):
    """Synthetic classification data of any ``input_shape`` (see the module docstring).

    Args:
        input_shape: ``(C, H, W)`` of the images.
        num_classes: number of classes.
        num_train, num_val, num_test: examples per split.
        noise_std: std of the Gaussian noise around the class prototype.
        seed: seed of the prototypes and the examples.
        batch_size: examples per batch **per process** (per GPU under DDP).
        Other arguments: see :class:`~normlightning.data.base.BaseDataModule` (``root`` is unused;
            ``val_fraction`` is not accepted: every split is generated).
    """

    holdout_val_from_train = False

    def __init__(
        self,
        *,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        num_train: int = 512,
        num_val: int = 128,
        num_test: int = 128,
        noise_std: float = 0.2,
        seed: int = 0,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        # val_fraction is fixed (and so left out of the CLI's arguments): every split is generated.
        super().__init__(seed=seed, batch_size=batch_size, val_fraction=0.0, **kwargs)
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"Synthetic: input_shape must be (C, H, W) with positive sizes, got {input_shape}")
        if num_classes < 1:
            raise ValueError(f"Synthetic: num_classes must be >= 1, got {num_classes}")
        if min(num_train, num_val, num_test) < 1:
            raise ValueError(
                f"Synthetic: num_train, num_val, num_test must be >= 1, got {num_train}, {num_val}, {num_test}"
            )
        if noise_std < 0:
            raise ValueError(f"Synthetic: noise_std must be >= 0, got {noise_std}")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.noise_std = noise_std
        self.num_classes = num_classes
        self.input_shape = shape
        self.mean = (0.5,) * shape[0]
        self.std = (0.25,) * shape[0]

    def build_dataset(self, split: Split) -> Dataset:
        return SyntheticDataset(
            self.sizes[split], self.input_shape, self.num_classes, self.noise_std, self.seed, _SPLIT_IDS[split]
        )
