"""N-way K-shot episodes for few-shot evaluation, on any labelled dataset.

:class:`EpisodeSampler` yields each episode's dataset indices (the ``N*K`` support examples class
by class, then the ``N*Q`` queries); :class:`EpisodeDataset` yields whole collated episodes.
Episodes are a pure function of ``(seed, epoch, episode index)`` and shard over replicas;
:func:`split_episode` cuts a batch into support and query with labels ``0 .. N-1``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

__all__ = ["EpisodeDataset", "EpisodeSampler", "split_episode"]


class EpisodeSampler(Sampler[list[int]]):
    """Seeded N-way K-shot Q-query episode batch sampler (see the module docstring).

    Args:
        labels: integer class label of every dataset index (sequence, array or tensor).
        n_way: classes per episode ``N``.
        k_shot: support examples per class ``K``.
        q_query: query examples per class ``Q`` (may be 0).
        episodes: number of episodes per pass (``len`` of the sampler, before sharding).
        seed: base seed.
        num_replicas, rank: shard the episodes across processes.

    Raises:
        ValueError: fewer than ``N`` classes, or a class with fewer than ``K + Q`` examples.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int = 15,
        episodes: int = 600,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels_t = torch.as_tensor(labels).flatten()
        if labels_t.is_floating_point() or labels_t.dtype == torch.bool:
            raise TypeError(f"EpisodeSampler labels must be integers, got dtype {labels_t.dtype}.")
        if n_way < 1 or k_shot < 1 or q_query < 0 or episodes < 1:
            raise ValueError(
                f"EpisodeSampler needs n_way >= 1, k_shot >= 1, q_query >= 0, episodes >= 1; "
                f"got n_way={n_way}, k_shot={k_shot}, q_query={q_query}, episodes={episodes}."
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"EpisodeSampler needs 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}."
            )
        self.classes = torch.unique(labels_t)  # sorted
        if len(self.classes) < n_way:
            raise ValueError(
                f"EpisodeSampler: n_way={n_way} but the dataset has only {len(self.classes)} classes; "
                f"lower n_way or use a split with more classes."
            )
        self.class_indices = [torch.nonzero(labels_t == c).flatten() for c in self.classes]
        need = k_shot + q_query
        small = [(int(c), len(idx)) for c, idx in zip(self.classes, self.class_indices, strict=True) if len(idx) < need]
        if small:
            raise ValueError(
                f"EpisodeSampler: every class needs k_shot + q_query = {need} examples; "
                f"these (class, count) pairs have fewer: {small[:10]}{' ...' if len(small) > 10 else ''}. "
                f"Lower k_shot/q_query or drop those classes."
            )
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.episodes, self.seed = episodes, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the episode set of ``epoch`` (seed ``seed + epoch``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(range(self.rank, self.episodes, self.num_replicas))

    def episode(self, i: int) -> list[int]:
        """Indices of episode ``i`` of the current epoch, in the documented order."""
        # Explicit mix (no Python hash) so episodes are identical across processes and versions.
        mixed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % (2**63 - 1)
        g = torch.Generator().manual_seed(mixed)
        chosen = torch.randperm(len(self.classes), generator=g)[: self.n_way]
        support, query = [], []
        for c in chosen.tolist():
            idx = self.class_indices[c]
            picked = idx[torch.randperm(len(idx), generator=g)[: self.k_shot + self.q_query]]
            support.extend(picked[: self.k_shot].tolist())
            query.extend(picked[self.k_shot :].tolist())
        return support + query

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.rank, self.episodes, self.num_replicas):
            yield self.episode(i)


class EpisodeDataset(IterableDataset):
    """Iterable of whole episodes, one dict each::

        {"image": (N*K + N*Q, C, H, W) float,            # support grouped by class, then queries
         "label": (N*K + N*Q,) int64 original labels,   # EpisodeSampler order
         "n_way": N, "k_shot": K, "q_query": Q, "episode": i}

    Args:
        dataset: map-style dataset of ``(image (C, H, W) tensor, label)``.
        labels: label of every index of ``dataset`` (int ``(len(dataset),)``).
        n_way, k_shot, q_query, episodes, seed: the episode set (see :class:`EpisodeSampler`).
        num_replicas, rank: this process's share of the episodes (``rank, rank + num_replicas, ...``).

    With loader workers, worker ``w`` of ``W`` yields every ``W``-th episode of the share. Being an
    ``IterableDataset``, it is left alone by Lightning under DDP (no ``DistributedSampler``).
    """

    def __init__(
        self,
        dataset: Dataset,
        labels: Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        episodes: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.sampler = EpisodeSampler(labels, n_way, k_shot, q_query, episodes, seed, num_replicas, rank)
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query

    def __len__(self) -> int:
        return len(self.sampler)

    def episode_ids(self) -> list[int]:
        """Indices (in the full seeded set) of the episodes this process and loader worker yield."""
        ids = list(range(self.sampler.rank, self.sampler.episodes, self.sampler.num_replicas))
        worker = get_worker_info()
        if worker is not None:
            ids = ids[worker.id :: worker.num_workers]
        return ids

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in self.episode_ids():
            indices = self.sampler.episode(i)
            items = [self.dataset[j] for j in indices]
            yield {
                "image": torch.stack([torch.as_tensor(item[0]) for item in items]),
                "label": torch.as_tensor([int(item[1]) for item in items], dtype=torch.long),
                "n_way": self.n_way,
                "k_shot": self.k_shot,
                "q_query": self.q_query,
                "episode": i,
            }


def split_episode(
    x: torch.Tensor, y: torch.Tensor, n_way: int, k_shot: int, q_query: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut an episode batch (in :class:`EpisodeSampler` order) into support and query.

    Args:
        x: episode inputs ``(N*K + N*Q, ...)``.
        y: their original labels ``(N*K + N*Q,)``, used to check the layout.
        n_way, k_shot, q_query: the episode's ``N``, ``K``, ``Q``.

    Returns:
        ``(support_x (N*K, ...), support_y (N*K,), query_x (N*Q, ...), query_y (N*Q,))`` with
        labels relabelled to ``0 .. N-1`` by the class's position in the episode.
    """
    n_support, n_query = n_way * k_shot, n_way * q_query
    if x.shape[0] != n_support + n_query or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"split_episode: expected {n_support} + {n_query} examples for a {n_way}-way {k_shot}-shot "
            f"{q_query}-query episode, got x {tuple(x.shape)} and y {tuple(y.shape)}."
        )
    support_y = torch.arange(n_way, device=y.device).repeat_interleave(k_shot)
    query_y = torch.arange(n_way, device=y.device).repeat_interleave(q_query)
    original = y[:n_support].view(n_way, k_shot)
    classes = original[:, 0]
    ok = (original == classes[:, None]).all() and len(torch.unique(classes)) == n_way
    if n_query:
        ok = ok and bool((y[n_support:].view(n_way, q_query) == classes[:, None]).all())
    if not ok:
        raise ValueError(
            "split_episode: the batch is not in EpisodeSampler order (support grouped by class, then "
            "queries grouped by class in the same class order). Use EpisodeSampler as the batch_sampler "
            "and a DataLoader without shuffling."
        )
    return x[:n_support], support_y, x[n_support:], query_y
