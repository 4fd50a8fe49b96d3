"""The ``data.unreadable_images`` policy: what a split does with an image file that cannot be read.

``error`` (the default): the :class:`~normlightning.data.errors.UnreadableImageError` stops the run,
naming the file. ``skip``: :class:`SkipUnreadableImages` replaces the item by the next readable one
of the split, so batches keep their size; each skipped file is named in a warning when it is first
met, and the data module reports how many it skipped at the end of the stage.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.data import Dataset

from normlightning.data.errors import UnreadableImageError, unreadable_image_error

UNREADABLE_IMAGE_POLICIES = ("error", "skip")


class SkipUnreadableImages(Dataset):
    """``dataset`` whose unreadable items are skipped.

    Item ``i`` is ``dataset[j]`` for the first ``j`` of ``i, i + 1, ...`` (wrapping around) whose
    image file can be read. Unreadable items are flagged in :attr:`unreadable`, a bool tensor
    ``(len(dataset),)`` in shared memory (loader workers flag them too), and are not read again.

    Args:
        dataset: a dataset whose ``__getitem__`` raises ``UnreadableImageError`` for a bad file.
        split: the split's name, for the messages.
    """

    def __init__(self, dataset: Dataset, split: str) -> None:
        self.dataset = dataset
        self.split = split
        self.unreadable = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.unreadable)

    def __getitem__(self, index: int) -> Any:
        size = len(self.unreadable)
        for offset in range(size):
            item = (index + offset) % size
            if self.unreadable[item]:
                continue
            try:
                return self.dataset[item]
            except UnreadableImageError as error:
                self.unreadable[item] = True
                warnings.warn(f"data.unreadable_images=skip: skipped {self.split} item {item}: {error}", stacklevel=2)
        raise unreadable_image_error(f"<every image of the {self.split} split>", "no image of the split can be read")

    @property
    def num_skipped(self) -> int:
        """How many items were found unreadable so far (in this process and its loader workers)."""
        return int(self.unreadable.sum())

    def report(self) -> str:
        """``"<n> unreadable image(s) of the <split> split skipped (items [...])"``."""
        items = torch.nonzero(self.unreadable).flatten().tolist()
        shown = ", ".join(map(str, items[:10])) + (", ..." if len(items) > 10 else "")
        return f"{len(items)} unreadable image(s) of the {self.split} split skipped (items {shown})"
