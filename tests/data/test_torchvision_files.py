"""MNIST, CIFAR-10 and CIFAR-100 DataModules against tiny fixtures in their real on-disk formats."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from normlightning.data import CIFAR10, CIFAR100, MNIST, DatasetNotFoundError
from normlightning.safe_loading import UnsafeFileError


def test_mnist_reads_idx_files(tmp_path, write_mnist) -> None:
    images, labels = write_mnist(tmp_path, num_train=12, num_test=6)
    dm = MNIST(root=str(tmp_path), batch_size=4)
    assert (dm.num_classes, dm.input_shape) == (10, (1, 28, 28))
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 6  # val = the test set by default
    x, y = dm.datasets["train"][3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(images[3]).float() / 255.0)
    assert int(y) == int(labels[3])


def test_mnist_val_fraction_holds_out_train(tmp_path, write_mnist) -> None:
    write_mnist(tmp_path, num_train=20)
    dm = MNIST(root=str(tmp_path), val_fraction=0.25, seed=0)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (15, 5)
    assert set(dm.datasets["train"].indices).isdisjoint(dm.datasets["val"].indices)


def test_mnist_missing_names_layout(tmp_path) -> None:
    dm = MNIST(root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte") as info:
        dm.setup("fit")
    assert "download=true" in str(info.value) and "MNIST/raw" in str(info.value)


def test_cifar10_reads_pickles_and_augments(tmp_path, write_cifar) -> None:
    test_images, test_labels = write_cifar(tmp_path, num_classes=10, per_file=4)
    dm = CIFAR10(root=str(tmp_path), batch_size=5)
    assert (dm.num_classes, dm.input_shape, len(dm.mean)) == (10, (3, 32, 32), 3)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 20 and len(dm.datasets["test"]) == 4
    # evaluation split: exactly the stored pixels / 255 in (C, H, W)
    x, y = dm.datasets["test"][2]
    assert torch.allclose(x, torch.from_numpy(test_images[2]).float() / 255.0)
    assert int(y) == test_labels[2]
    # training split: pad 4 + random crop 32 + flip keeps the shape; every value is a stored pixel or 0 padding
    xt, _ = dm.datasets["train"][0]
    assert xt.shape == (3, 32, 32)
    crop = (xt * 255).round()
    stored = torch.from_numpy(dm.datasets["train"].data[0]).permute(2, 0, 1).float()  # HWC -> CHW
    padded = torch.nn.functional.pad(stored, (4, 4, 4, 4))
    candidates = [
        window.flip(-1) if flip else window
        for dy in range(9)
        for dx in range(9)
        for window in [padded[:, dy : dy + 32, dx : dx + 32]]
        for flip in (False, True)
    ]
    assert any(torch.equal(crop, c) for c in candidates)
    batch_x, batch_y = next(iter(dm.train_dataloader()))
    assert batch_x.shape == (5, 3, 32, 32) and batch_y.shape == (5,)


def _pad_crop_windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every 32x32 window of ``image`` zero-padded by ``padding`` per side, and its horizontal mirror."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    offsets = range(2 * padding + 1)
    windows = [padded[:, dy : dy + 32, dx : dx + 32] for dy in offsets for dx in offsets]
    return windows + [window.flip(-1) for window in windows]


def test_cifar_crop_padding_sets_the_padded_square(tmp_path, write_cifar) -> None:
    """crop_padding=2 (HN §4.1: "padded with 0 to 36x36"): every crop is a window of the 36x36 square,
    and over 40 draws the crops cover more than the unpadded image (the padding is used)."""
    write_cifar(tmp_path, num_classes=10, per_file=4)
    dm = CIFAR10(root=str(tmp_path), batch_size=5, crop_padding=2)
    assert dm.crop_padding == 2
    dm.setup("fit")
    stored = torch.from_numpy(dm.datasets["train"].data[0]).permute(2, 0, 1).float()  # HWC -> CHW
    allowed, unpadded = _pad_crop_windows(stored, 2), _pad_crop_windows(stored, 0)
    torch.manual_seed(0)
    crops = [(dm.datasets["train"][0][0] * 255).round() for _ in range(40)]
    assert all(any(torch.equal(crop, window) for window in allowed) for crop in crops)
    assert not all(any(torch.equal(crop, window) for window in unpadded) for crop in crops)
    with pytest.raises(ValueError, match="crop_padding"):
        CIFAR10(root=str(tmp_path), crop_padding=-1)


def test_cifar100_reads_pickles(tmp_path, write_cifar) -> None:
    test_images, test_labels = write_cifar(tmp_path, num_classes=100, per_file=6)
    dm = CIFAR100(root=str(tmp_path))
    assert dm.num_classes == 100
    dm.setup("test")
    x, y = dm.datasets["test"][5]
    assert torch.allclose(x, torch.from_numpy(test_images[5]).float() / 255.0) and int(y) == test_labels[5]


def test_cifar_incomplete_folder_names_missing_files(tmp_path, write_cifar) -> None:
    write_cifar(tmp_path, num_classes=10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        CIFAR10(root=str(tmp_path)).setup("fit")
    assert "cifar-10-python.tar.gz" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        CIFAR100(root=str(tmp_path)).setup("test")


def test_cifar_batch_carrying_a_call_is_refused_before_it_runs(tmp_path, write_cifar, load_time_payload) -> None:
    payload, marker = load_time_payload
    write_cifar(tmp_path / "data", num_classes=10)
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    with open(batch, "wb") as f:
        pickle.dump({**entry, "batch_label": payload}, f, protocol=2)
    refused = rf"CIFAR file '.*data_batch_2' needs the type {os.system.__module__}\.system"
    with pytest.raises(UnsafeFileError, match=refused):
        CIFAR10(root=str(tmp_path / "data")).setup("fit")
    assert not marker.exists()
    with open(batch, "rb") as f:  # the file is live: torchvision's plain pickle.load would run its call
        pickle.load(f, encoding="latin1")
    assert marker.exists()
