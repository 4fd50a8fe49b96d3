"""A training-set order that depends on the epoch, not on the global random state.

:class:`EpochSeededRandomSampler` draws epoch ``e``'s permutation from a generator seeded with
``(seed, e)``. Lightning calls ``set_epoch`` at every epoch start (also after a resume), so a run
resumed at an epoch boundary visits the examples in the same order as an uninterrupted one.
Being a ``RandomSampler``, Lightning still recognises the loader as shuffled and, under DDP,
replaces it with its ``DistributedSampler``, which is seeded by epoch as well.

:func:`seeded_loader_generator` is the loader's own generator: a ``DataLoader`` draws its workers'
base seed from it each time an iterator starts (from the global generator when it has none, which
would make the global random state depend on when Lightning creates iterators).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler

__all__ = ["EpochSeededRandomSampler", "global_seed", "seeded_loader_generator"]


def global_seed() -> int:
    """The seed of ``seed_everything`` (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _mix(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for ``(seed, epoch, stream)``."""
    return ((seed & 0xFFFFFFFF) << 31 ^ (epoch & 0x3FFFFFFF) << 1 ^ stream) & 0x7FFFFFFFFFFFFFFF


def seeded_loader_generator(seed: int | None = None) -> torch.Generator:
    """A generator for a ``DataLoader``'s worker seeds, seeded from ``seed`` (``None``: the global seed)."""
    return torch.Generator().manual_seed(_mix(global_seed() if seed is None else int(seed), 0, 1))


class EpochSeededRandomSampler(RandomSampler):
    """A random permutation of the dataset per epoch, drawn from ``(seed, epoch)``.

    Args:
        data_source: the dataset (sized).
        seed: base seed; ``None``: the global seed of ``seed_everything`` when the sampler is made.
        loader_generator: the ``DataLoader``'s own generator (:func:`seeded_loader_generator`);
            reseeded from ``(seed, epoch)`` at each ``set_epoch``, so the workers' seeds of an epoch
            do not depend on the epochs before it.
    """

    def __init__(
        self, data_source: Sized, seed: int | None = None, loader_generator: torch.Generator | None = None
    ) -> None:
        super().__init__(data_source)
        self.seed = global_seed() if seed is None else int(seed)
        self.loader_generator = loader_generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch`` (Lightning calls this at each epoch start)."""
        self.epoch = int(epoch)
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(_mix(self.seed, self.epoch, 1))

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0))
        return super().__iter__()
