"""EpisodeSampler: counts, distinct classes, no overlap, seeding, order, errors."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from normlightning.data.episodes import EpisodeSampler, split_episode

LABELS = [c for c in range(7) for _ in range(6)]  # 7 classes x 6 examples, grouped
LABELS = LABELS[::2] + LABELS[1::2]  # interleave so indices are not class-sorted


def test_episode_counts_classes_overlap_order():
    n, k, q = 4, 2, 3
    sampler = EpisodeSampler(LABELS, n, k, q, episodes=10, seed=5)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 10
    for ep in episodes:
        assert len(ep) == n * k + n * q
        assert len(set(ep)) == len(ep)  # no overlap within or between support and query
        labels = [LABELS[i] for i in ep]
        support, query = labels[: n * k], labels[n * k :]
        classes = support[::k]
        assert len(set(classes)) == n
        assert support == [c for c in classes for _ in range(k)]
        assert query == [c for c in classes for _ in range(q)]


def test_same_seed_same_episodes():
    a = list(EpisodeSampler(LABELS, 3, 1, 2, episodes=5, seed=1))
    assert a == list(EpisodeSampler(LABELS, 3, 1, 2, episodes=5, seed=1))
    s = EpisodeSampler(LABELS, 3, 1, 2, episodes=5, seed=1)
    assert list(s) == list(s)  # a fixed set on every pass
    assert a != list(EpisodeSampler(LABELS, 3, 1, 2, episodes=5, seed=2))
    s.set_epoch(1)
    assert list(s) != a


def test_sharding_covers_the_set():
    full = list(EpisodeSampler(LABELS, 3, 1, 1, episodes=5, seed=0))
    r0 = list(EpisodeSampler(LABELS, 3, 1, 1, episodes=5, seed=0, num_replicas=2, rank=0))
    r1 = list(EpisodeSampler(LABELS, 3, 1, 1, episodes=5, seed=0, num_replicas=2, rank=1))
    assert r0 == full[0::2] and r1 == full[1::2]


def test_loader_and_split_episode():
    n, k, q = 3, 2, 2
    x = torch.arange(len(LABELS), dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(LABELS)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=EpisodeSampler(LABELS, n, k, q, episodes=2, seed=0))
    for bx, by in loader:
        sx, sy, qx, qy = split_episode(bx, by, n, k, q)
        assert sx.shape == (n * k, 1) and qx.shape == (n * q, 1)
        assert sy.tolist() == [0, 0, 1, 1, 2, 2] and qy.tolist() == [0, 0, 1, 1, 2, 2]
        orig = by[: n * k]
        for j in range(n):  # relabelled class j is the j-th class of the episode
            assert (y[sx[sy == j, 0].long()] == orig[j * k]).all()
            assert (y[qx[qy == j, 0].long()] == orig[j * k]).all()
    with pytest.raises(ValueError, match="EpisodeSampler order"):
        split_episode(x[:12], y[:12], n, k, q)


def test_episode_errors():
    with pytest.raises(ValueError, match="only 7 classes"):
        EpisodeSampler(LABELS, 8, 1, 1)
    with pytest.raises(ValueError, match="k_shot \\+ q_query = 7"):
        EpisodeSampler(LABELS, 2, 2, 5)
    with pytest.raises(TypeError, match="integers"):
        EpisodeSampler([0.5, 1.5], 1, 1, 0)
