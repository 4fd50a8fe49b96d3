"""Digits (the quickstart data) and Synthetic DataModules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from normlightning.data import Digits, Synthetic, split_indices


def test_split_indices_partitions_and_is_seeded() -> None:
    a, b, rest = split_indices(100, [0.2, 0.1], seed=3)
    assert (len(a), len(b), len(rest)) == (20, 10, 70)
    assert sorted(a + b + rest) == list(range(100))
    assert split_indices(100, [0.2, 0.1], seed=3) == [a, b, rest]
    assert split_indices(100, [0.2, 0.1], seed=4) != [a, b, rest]
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, [0.6, 0.5], seed=0)


def test_digits_attributes_splits_and_values() -> None:
    dm = Digits(batch_size=16, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 8, 8))
    raw = load_digits()
    # the documented mean/std are those of all images scaled to [0, 1]
    assert dm.mean[0] == pytest.approx(float(np.mean(raw.data / 16)), abs=1e-4)
    assert dm.std[0] == pytest.approx(float(np.std(raw.data / 16)), abs=1e-4)
    dm.setup("fit")
    dm.setup("test")
    sizes = {split: len(dm.datasets[split]) for split in ("train", "val", "test")}
    assert sizes == {"val": round(0.2 * 1797), "test": round(0.2 * 1797), "train": 1797 - 2 * round(0.2 * 1797)}
    # every image of the val split is one of sklearn's images divided by 16
    x, y = dm.datasets["val"][0]
    matches = np.where((np.abs(raw.images / 16.0 - x[0].numpy()) < 1e-6).all(axis=(1, 2)))[0]
    assert len(matches) >= 1 and int(y) in raw.target[matches]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0


def test_digits_bad_fractions() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        Digits(val_fraction=0.5, test_fraction=0.5)


def test_synthetic_shapes_determinism_and_signal() -> None:
    dm = Synthetic(input_shape=(2, 5, 7), num_classes=3, num_train=40, num_val=8, num_test=4, noise_std=0.05, seed=1)
    assert (dm.num_classes, dm.input_shape, dm.mean, dm.std) == (3, (2, 5, 7), (0.5, 0.5), (0.25, 0.25))
    dm.setup("fit")
    train = dm.datasets["train"]
    x0, y0 = train[0]
    x0b, y0b = Synthetic(input_shape=(2, 5, 7), num_classes=3, num_train=40, noise_std=0.05, seed=1).build_dataset(
        "train"
    )[0]
    assert torch.equal(x0, x0b) and int(y0) == int(y0b)
    assert x0.shape == (2, 5, 7) and 0 <= float(x0.min()) and float(x0.max()) <= 1
    # learnable: a nearest-prototype classifier (computed here from the training examples) is far above chance
    xs = torch.stack([train[i][0] for i in range(40)])
    ys = torch.stack([train[i][1] for i in range(40)])
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(3)])
    val = dm.datasets["val"]
    correct = sum(int(((centroids - val[i][0]) ** 2).flatten(1).sum(1).argmin() == val[i][1]) for i in range(8))
    assert correct >= 7
    assert len(dm.datasets["val"]) == 8
    with pytest.raises(IndexError, match="out of range"):
        train[40]


def test_synthetic_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        Synthetic(input_shape=(3, 32))
