"""MiniImageNet: both on-disk layouts from tiny fixtures, augmentation, and clear errors for bad data."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normlightning.data.errors import DatasetNotFoundError
from normlightning.data.mini_imagenet import PICKLE_FILES, MiniImageNet
from normlightning.safe_loading import UnsafeFileError

SIZE = 12
SMALL = {"n_way": 2, "test_shots": [1, 2], "q_query": 2, "test_episodes": 3, "val_shot": 1, "val_episodes": 2}
SPLIT_CLASSES = {"train": ["n02", "n01", "n03"], "val": ["n10", "n11"], "test": ["n20", "n21", "n22"]}


def _pixels(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_csv_layout(
    root: Path, nested: bool = False, csv_in_split: bool = True, per_class: int = 4
) -> dict[str, np.ndarray]:
    """images/ (PNG, lossless) + {split/,}{train,val,test}.csv; returns pixels by filename."""
    images = root / "images"
    images.mkdir(parents=True)
    split_dir = root / "split" if csv_in_split else root
    split_dir.mkdir(exist_ok=True)
    pixels = {}
    seed = 0
    for split, classes in SPLIT_CLASSES.items():
        with open(split_dir / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid in classes:
                for i in range(per_class):
                    name = f"{wnid}{i:08d}.png"
                    folder = images / wnid if nested else images
                    folder.mkdir(exist_ok=True)
                    pixels[name] = _pixels(seed)
                    Image.fromarray(pixels[name]).save(folder / name)
                    writer.writerow([name, wnid])
                    seed += 1
    return pixels


def write_pickle_layout(root: Path, per_class: int = 4) -> dict[str, dict]:
    """The Gidaris/MetaOptNet pickles (protocol 2, dict with data uint8 (N, H, W, 3) and labels)."""
    root.mkdir(parents=True, exist_ok=True)
    first_label = {"train": 0, "val": 64, "test": 80}
    counts = {"train": 3, "val": 2, "test": 3}
    contents = {}
    for split, name in PICKLE_FILES.items():
        labels = [first_label[split] + c for c in range(counts[split]) for _ in range(per_class)]
        data = np.stack([_pixels(100 + i) for i in range(len(labels))])
        contents[split] = {"data": data, "labels": labels, "catname2label": {}}
        with open(root / name, "wb") as f:
            pickle.dump(contents[split], f, protocol=2)
    return contents


def _plain(root: Path, **kwargs) -> MiniImageNet:
    return MiniImageNet(
        root=str(root),
        image_size=SIZE,
        num_base_classes=3,
        augment=False,
        num_workers=0,
        batch_size=5,
        pin_memory=False,
        **{**SMALL, **kwargs},
    )


@pytest.mark.parametrize("nested,csv_in_split", [(False, True), (True, False)])
def test_csv_layout_loads(tmp_path: Path, nested: bool, csv_in_split: bool) -> None:
    pixels = write_csv_layout(tmp_path, nested=nested, csv_in_split=csv_in_split)
    dm = _plain(tmp_path)
    assert dm.layout == "csv" and dm.num_classes == 3 and dm.input_shape == (3, SIZE, SIZE)
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 12
    # labels: sorted wnids n01, n02, n03 -> 0, 1, 2; the csv lists n02 first
    assert train[0][1] == 1 and train[4][1] == 0 and train[8][1] == 2
    image = train[0][0]
    expected = torch.as_tensor(pixels["n0200000000.png"]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image, expected)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, SIZE, SIZE) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (2 * 1 + 2 * 2, 3, SIZE, SIZE) and val["k_shot"] == 1
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert [len(loader) for loader in loaders] == [3, 3]
    episode = next(iter(loaders[1]))
    assert episode["image"].shape == (2 * 2 + 2 * 2, 3, SIZE, SIZE) and episode["k_shot"] == 2


def test_csv_layout_resizes_other_sizes(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    dm = MiniImageNet(root=str(tmp_path), image_size=6, num_base_classes=3, augment=False, num_workers=0, **SMALL)
    dm.setup("fit")
    assert dm.datasets["train"][0][0].shape == (3, 6, 6)


def test_pickle_layout_loads(tmp_path: Path) -> None:
    contents = write_pickle_layout(tmp_path)
    dm = _plain(tmp_path)
    assert dm.layout == "pickle" and dm.num_classes == 3
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 12 and [int(train[i][1]) for i in (0, 4, 11)] == [0, 1, 2]
    torch.testing.assert_close(
        train[5][0], torch.as_tensor(contents["train"]["data"][5]).permute(2, 0, 1).float() / 255
    )
    val = next(iter(dm.val_dataloader()))
    assert set(val["label"].tolist()) <= {0, 1}  # val classes 64, 65 renumbered within the split
    dm.setup("test")
    assert len(dm.datasets["test"]) == 12 and sorted(set(dm.split_labels["test"].tolist())) == [0, 1, 2]
    assert MiniImageNet(root=str(tmp_path), image_size=SIZE, num_base_classes=None, **SMALL).num_classes == 3


def test_auto_prefers_pickles_and_layout_can_be_forced(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    write_pickle_layout(tmp_path)
    assert _plain(tmp_path).layout == "pickle"
    assert _plain(tmp_path, layout="csv").layout == "csv"


def test_train_augmentation_is_a_padded_crop(tmp_path: Path) -> None:
    contents = write_pickle_layout(tmp_path)
    dm = MiniImageNet(
        root=str(tmp_path),
        image_size=SIZE,
        num_base_classes=3,
        crop_padding=2,
        color_jitter=0.0,
        flip=False,
        num_workers=0,
        **SMALL,
    )
    dm.setup("fit")
    original = torch.as_tensor(contents["train"]["data"][3]).permute(2, 0, 1).float() / 255
    padded = torch.nn.functional.pad(original, (2, 2, 2, 2))
    torch.manual_seed(0)
    for _ in range(5):
        out = dm.datasets["train"][3][0]
        crops = [padded[:, i : i + SIZE, j : j + SIZE] for i in range(5) for j in range(5)]
        assert any(torch.allclose(out, crop) for crop in crops)
    jittered = MiniImageNet(root=str(tmp_path), image_size=SIZE, num_base_classes=3, num_workers=0, **SMALL)
    jittered.setup("fit")
    out = jittered.datasets["train"][3][0]
    assert out.shape == (3, SIZE, SIZE) and 0 <= out.min() and out.max() <= 1


def test_missing_dataset_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="(?s)csv layout.*pickle layout"):
        MiniImageNet(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="neither"):
        MiniImageNet(root=str(tmp_path / "empty"))


def test_malformed_csv_and_missing_images(tmp_path: Path) -> None:
    write_csv_layout(tmp_path)
    (tmp_path / "images" / "n0100000000.png").unlink()  # first image of n01 (listed in train.csv)
    with pytest.raises(DatasetNotFoundError, match="1 images listed"):
        _plain(tmp_path)
    (tmp_path / "split" / "train.csv").write_text("file;class\nx;y\n")
    with pytest.raises(DatasetNotFoundError, match="header 'filename,label'"):
        _plain(tmp_path)


def test_malformed_pickles(tmp_path: Path) -> None:
    write_pickle_layout(tmp_path)
    with open(tmp_path / PICKLE_FILES["val"], "wb") as f:
        pickle.dump({"data": np.zeros((2, SIZE, SIZE, 3), np.uint8)}, f)
    dm = _plain(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="keys 'data' and 'labels'"):
        dm.setup("fit")
    (tmp_path / PICKLE_FILES["test"]).write_bytes(b"not a pickle")
    with pytest.raises(DatasetNotFoundError, match="cannot read"):
        dm.setup("test")
    with open(tmp_path / PICKLE_FILES["train"], "wb") as f:
        pickle.dump({"data": np.zeros((2, SIZE, SIZE), np.float32), "labels": [0, 1]}, f)
    with pytest.raises(DatasetNotFoundError, match=r"uint8 \(N, H, W, 3\)"):
        MiniImageNet(root=str(tmp_path), num_base_classes=None, **SMALL)
    with pytest.raises(DatasetNotFoundError, match="training split has 3 classes"):
        write_pickle_layout(tmp_path)
        MiniImageNet(root=str(tmp_path), num_base_classes=64, image_size=SIZE, **SMALL).setup("fit")


def test_pickle_carrying_a_call_is_refused_before_it_runs(tmp_path: Path, load_time_payload) -> None:
    payload, marker = load_time_payload
    contents = write_pickle_layout(tmp_path / "data")
    train = tmp_path / "data" / PICKLE_FILES["train"]
    with open(train, "wb") as f:  # a well-formed file that also carries a call
        pickle.dump({**contents["train"], "catname2label": payload}, f, protocol=2)
    refused = (
        rf"MiniImageNet file '.*{PICKLE_FILES['train']}' needs the type {os.system.__module__}\.system to load"
        r".*numpy arrays.*convert it once"
    )
    with pytest.raises(UnsafeFileError, match=refused):  # read at construction
        MiniImageNet(root=str(tmp_path / "data"), image_size=SIZE, num_base_classes=None, **SMALL)
    with pytest.raises(UnsafeFileError, match=refused):  # read in setup
        _plain(tmp_path / "data").setup("fit")
    assert not marker.exists()
    with open(train, "rb") as f:  # the file is live: plain pickle.load runs its call
        pickle.load(f, encoding="latin1")
    assert marker.exists()


def test_pickles_of_numpy_1_and_protocol_5_load(tmp_path: Path) -> None:
    """The distributed files name numpy 1's module ``numpy.core`` (protocol 2); newer ones may use protocol 5."""
    contents = write_pickle_layout(tmp_path)
    numpy_1 = pickle.dumps(contents["train"], protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in numpy_1
    (tmp_path / PICKLE_FILES["train"]).write_bytes(numpy_1)
    (tmp_path / PICKLE_FILES["val"]).write_bytes(pickle.dumps(contents["val"], protocol=5))
    dm = _plain(tmp_path)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.datasets["train"].images, contents["train"]["data"])
    np.testing.assert_array_equal(dm._read_pickle("val")[0], contents["val"]["data"])
