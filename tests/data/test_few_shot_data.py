"""Few-shot data plumbing: episode batches, their sharding across processes/workers, class splits of any dataset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

import normlightning.data.episodes as episodes_module
from normlightning.data import Digits
from normlightning.data.episodes import EpisodeDataset
from normlightning.data.few_shot import ClassSplitFewShotDataModule, dataset_labels


def _toy(num_classes: int = 6, per_class: int = 5) -> tuple[TensorDataset, torch.Tensor]:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return TensorDataset(images, labels), labels


def test_episode_batches_follow_the_sampler_order() -> None:
    dataset, labels = _toy()
    episodes = list(EpisodeDataset(dataset, labels, n_way=3, k_shot=2, q_query=1, episodes=4, seed=7))
    assert [e["episode"] for e in episodes] == [0, 1, 2, 3]
    for e in episodes:
        assert (e["n_way"], e["k_shot"], e["q_query"]) == (3, 2, 1)
        index = e["image"][:, 0, 0, 0].long()  # image value == dataset index
        assert torch.equal(e["label"], labels[index])
        support, query = e["label"][:6].view(3, 2), e["label"][6:]
        assert torch.equal(support[:, 0], support[:, 1]) and torch.equal(query, support[:, 0])
        assert len(set(index.tolist())) == 9  # no image twice


def test_episodes_shard_across_processes_and_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, labels = _toy()
    single = {e["episode"]: e["label"] for e in EpisodeDataset(dataset, labels, 2, 1, 2, episodes=7, seed=3)}
    shards = [EpisodeDataset(dataset, labels, 2, 1, 2, episodes=7, seed=3, num_replicas=3, rank=r) for r in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    seen = {}
    for shard in shards:
        for e in shard:
            assert e["episode"] not in seen
            seen[e["episode"]] = e["label"]
    assert seen.keys() == single.keys() and all(torch.equal(seen[i], single[i]) for i in single)
    # loader workers split a process's share: worker 1 of 2 on rank 0 gets episodes 3 (rank 0 has 0, 3, 6)
    monkeypatch.setattr(episodes_module, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    assert [e["episode"] for e in shards[0]] == [3]


def test_dataset_labels_without_loading_images() -> None:
    dataset, labels = _toy()
    assert torch.equal(dataset_labels(dataset), labels)
    subset = torch.utils.data.Subset(dataset, [4, 0, 11])
    assert dataset_labels(subset).tolist() == [0, 0, 2]
    concat = torch.utils.data.ConcatDataset([subset, dataset])
    assert dataset_labels(concat).tolist() == [0, 0, 2, *labels.tolist()]


def test_class_split_over_digits() -> None:
    dm = ClassSplitFewShotDataModule(
        source=Digits(),
        base_classes=[7, 3, 5],
        val_classes=[0, 1],
        novel_classes=[2, 4, 6],
        n_way=2,
        test_shots=[1],
        q_query=3,
        test_episodes=4,
        val_shot=1,
        val_episodes=2,
        batch_size=8,
        augment=False,
    )
    assert dm.num_classes == 3 and dm.input_shape == (1, 8, 8) and dm.mean == Digits.MEAN
    dm.setup("fit")
    dm.setup("test")
    from sklearn.datasets import load_digits

    counts = torch.bincount(torch.as_tensor(load_digits().target), minlength=10)
    train = dm.datasets["train"]
    assert len(train) == int(counts[[7, 3, 5]].sum())  # all images of the base classes, from every source split
    assert torch.equal(torch.bincount(dm.split_labels["train"]), counts[[7, 3, 5]])  # 7 -> 0, 3 -> 1, 5 -> 2
    assert set(dm.split_labels["val"].tolist()) == {0, 1}
    assert set(dm.split_labels["test"].tolist()) == {2, 4, 6}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and int(y.max()) <= 2
    episode = next(iter(dm.test_dataloader()[0]))
    assert set(episode["label"].tolist()) <= {2, 4, 6} and episode["image"].shape == (2 + 6, 1, 8, 8)


def test_class_split_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="must be disjoint"):
        ClassSplitFewShotDataModule(source=Digits(), base_classes=[0, 1], novel_classes=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="fewer than n_way=5"):
        ClassSplitFewShotDataModule(source=Digits(), base_classes=[0, 1], novel_classes=[2, 3])
    with pytest.raises(ValueError, match="test_shots"):
        ClassSplitFewShotDataModule(source=Digits(), base_classes=[0], novel_classes=[1, 2, 3, 4, 5], test_shots=[])
    dm = ClassSplitFewShotDataModule(source=Digits(), base_classes=[0, 11], novel_classes=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"classes \[11\] do not occur"):
        dm.setup("fit")
    assert dm.val_dataloader() == []  # no validation classes: no validation episodes


def test_validation_has_its_own_episode_settings() -> None:
    """A validation split with fewer classes than the test's n_way runs with its own val_n_way/val_q_query."""
    with pytest.raises(ValueError, match="val_classes has 3 classes, fewer than val_n_way=5"):
        ClassSplitFewShotDataModule(
            source=Digits(), base_classes=[0, 1], val_classes=[2, 3, 4], novel_classes=[5, 6, 7, 8, 9]
        )
    dm = ClassSplitFewShotDataModule(
        source=Digits(),
        base_classes=[0, 1],
        val_classes=[2, 3, 4],
        novel_classes=[5, 6, 7, 8, 9],
        val_n_way=3,
        val_q_query=2,
        val_shot=1,
        val_episodes=2,
        test_shots=[1],
        q_query=4,
        test_episodes=2,
        augment=False,
    )
    dm.setup("fit")
    dm.setup("test")
    episode = next(iter(dm.val_dataloader()))
    assert set(episode["label"].tolist()) == {2, 3, 4} and episode["image"].shape[0] == 3 * (1 + 2)
    test_episode = next(iter(dm.test_dataloader()[0]))
    assert len(set(test_episode["label"].tolist())) == 5 and test_episode["image"].shape[0] == 5 * (1 + 4)
