"""SVHN, Caltech-256, Flowers-102, CUB-200-2011 DataModules and the RandAugment wrapper,
each against a tiny fixture written in the dataset's official on-disk format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from normlightning.data import CIFAR10, DatasetNotFoundError, Synthetic
from normlightning.data.caltech256 import Caltech256
from normlightning.data.cub200 import CUB200
from normlightning.data.errors import UnreadableImageError
from normlightning.data.flowers102 import Flowers102
from normlightning.data.randaugment import RandAugmentDataset, RandAugmented
from normlightning.data.svhn import SVHN

# one solid colour per class, so that a label can be checked from the pixels
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _jpeg(path: Path, colour: tuple[int, int, int], mode: str = "RGB", size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), colour)
    (image.convert("L") if mode == "L" else image).save(path, quality=95)


def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(1, 2))


# ----------------------------------------------------------------------------- SVHN
def _write_svhn(root: Path, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """Official 'Format 2' .mat files: X uint8 (32, 32, 3, N), y (N, 1) with digit 0 stored as 10."""
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    for split, n in counts.items():
        digits = np.arange(n) % 10
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)
        x[:, :, 0, :] = (digits * 20).astype(np.uint8)  # red channel encodes the digit
        y = np.where(digits == 0, 10, digits).reshape(n, 1).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        labels[split] = digits
    return labels


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path) -> None:
    labels = _write_svhn(tmp_path, {"train": 10, "test": 5, "extra": 6})
    dm = SVHN(root=str(tmp_path), batch_size=4)
    assert (dm.num_classes, dm.input_shape) == (10, (3, 32, 32))
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 10 and len(dm.datasets["val"]) == 5  # val = test split
    for i in (0, 3):
        x, y = dm.datasets["train"][i]
        assert int(y) == labels["train"][i] and x.shape == (3, 32, 32)
        assert float(x[0].mean()) == pytest.approx(labels["train"][i] * 20 / 255, abs=1e-6)
    pooled = SVHN(root=str(tmp_path), use_extra=True, val_fraction=0.25, augment=True)
    pooled.setup("fit")
    # train + extra = 16 images; round(0.25 * 16) = 4 held out for validation
    assert (len(pooled.datasets["train"]), len(pooled.datasets["val"])) == (12, 4)
    xb, yb = next(iter(pooled.train_dataloader()))
    assert xb.shape == (12, 3, 32, 32)


def test_svhn_missing_files(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat") as info:
        SVHN(root=str(tmp_path)).setup("fit")
    assert "ufldl.stanford.edu" in str(info.value)
    _write_svhn(tmp_path, {"train": 2, "test": 2})
    with pytest.raises(DatasetNotFoundError, match="extra_32x32.mat"):
        SVHN(root=str(tmp_path), use_extra=True).setup("fit")


# ----------------------------------------------------------------------------- Caltech-256
def _write_caltech(root: Path, per_class: int, num_classes: int = 3, clutter: int = 2) -> None:
    """256_ObjectCategories/<nnn.name>/<nnn>_<kkkk>.jpg; class 0 is stored as grayscale."""
    base = root / "caltech256" / "256_ObjectCategories"
    names = [f"{i + 1:03d}.thing{i}" for i in range(num_classes)]
    for c, name in enumerate(names):
        for k in range(per_class):
            _jpeg(base / name / f"{c + 1:03d}_{k + 1:04d}.jpg", COLOURS[c], mode="L" if c == 0 else "RGB")
    for k in range(clutter):
        _jpeg(base / "257.clutter" / f"257_{k + 1:04d}.jpg", COLOURS[3])


def test_caltech256_fraction_split_grayscale_and_clutter(tmp_path) -> None:
    _write_caltech(tmp_path, per_class=5)
    dm = Caltech256(root=str(tmp_path), expected_num_classes=3, image_size=8, num_workers=0, batch_size=2)
    assert dm.num_classes == 3 and dm.input_shape == (3, 8, 8)
    index = dm.split_index()
    # 15 images without clutter: round(0.2 * 15) = 3 test, 12 train; val = test
    assert (len(index["train"]), len(index["test"])) == (12, 3) and index["val"] == index["test"]
    assert not set(index["train"]) & set(index["test"])
    dm.setup("fit")
    labels = {int(dm.datasets["val"][i][1]) for i in range(3)} | {int(dm.datasets["train"][i][1]) for i in range(12)}
    assert labels == {0, 1, 2}  # clutter (class 3) left out
    test_sets = Caltech256(root=str(tmp_path), expected_num_classes=3, image_size=8)
    test_sets.setup("test")
    for x, y in (test_sets.datasets["test"][i] for i in range(3)):
        assert x.shape == (3, 8, 8)
        if int(y) == 0:  # grayscale red: L = 0.299 * 255 copied to three channels
            assert torch.allclose(_mean_colour(x), torch.full((3,), 0.299), atol=0.02)
    with_clutter = Caltech256(root=str(tmp_path), include_clutter=True, expected_num_classes=4, image_size=8)
    # 17 images with clutter: round(0.2 * 17) = 3 test, 14 train
    assert with_clutter.num_classes == 4 and len(with_clutter.split_index()["train"]) == 14


def test_caltech256_per_class_split(tmp_path) -> None:
    _write_caltech(tmp_path, per_class=6)
    dm = Caltech256(root=str(tmp_path), per_class_split=[3, 1, 2], expected_num_classes=3, image_size=8)
    index = dm.split_index()
    assert [len(index[s]) for s in ("train", "val", "test")] == [9, 3, 6]
    assert not (set(index["train"]) & set(index["val"])) and not (set(index["val"]) & set(index["test"]))
    dm.setup("fit")
    counts = torch.bincount(torch.tensor([int(dm.datasets["train"][i][1]) for i in range(9)]), minlength=3)
    assert counts.tolist() == [3, 3, 3]
    assert Caltech256(root=str(tmp_path), per_class_split=[3, 1, 2], expected_num_classes=3).split_index() == index
    with pytest.raises(ValueError, match="fewer than per_class_split"):
        Caltech256(root=str(tmp_path), per_class_split=[5, 1, 2], expected_num_classes=3).split_index()


def test_caltech256_missing_and_incomplete(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="256_ObjectCategories") as info:
        Caltech256(root=str(tmp_path))
    assert "data.caltech.edu" in str(info.value)
    _write_caltech(tmp_path, per_class=1)
    with pytest.raises(DatasetNotFoundError, match="found 3 classes, expected 256"):
        Caltech256(root=str(tmp_path))


# ----------------------------------------------------------------------------- Flowers-102
def _write_flowers(root: Path) -> dict[str, list[int]]:
    """flowers-102/jpg/image_%05d.jpg, imagelabels.mat (labels 1..102), setid.mat (trnid/valid/tstid)."""
    base = root / "flowers-102"
    labels = [1, 2, 3, 1, 2, 3, 1, 2]  # image ids 1..8
    for image_id, label in enumerate(labels, 1):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", COLOURS[label - 1])
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    split = {"trnid": [1, 2, 3], "valid": [4, 5], "tstid": [6, 7, 8]}
    scipy.io.savemat(base / "setid.mat", {k: np.array([v]) for k, v in split.items()})
    return {"train": [labels[i - 1] - 1 for i in split["trnid"]], "val": [0, 1], "test": [2, 0, 1]}


def test_flowers102_official_split(tmp_path) -> None:
    expected = _write_flowers(tmp_path)
    dm = Flowers102(root=str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    assert (dm.num_classes, dm.input_shape) == (102, (3, 8, 8))
    dm.setup("fit")
    dm.setup("test")
    for split in ("train", "val", "test"):
        data = dm.datasets[split]
        assert [int(data[i][1]) for i in range(len(data))] == expected[split]
    x, y = dm.datasets["test"][0]  # class 2 -> blue, center crop of a solid image
    assert torch.allclose(_mean_colour(x), torch.tensor([0.0, 0.0, 1.0]), atol=0.05)


def test_flowers102_missing(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="setid.mat") as info:
        Flowers102(root=str(tmp_path)).setup("fit")
    assert "robots.ox.ac.uk" in str(info.value)


# ----------------------------------------------------------------------------- CUB-200-2011
def _write_cub(root: Path) -> None:
    folder = root / "CUB_200_2011"
    rows = [  # id, class (1-based), is_train
        (1, 1, 1),
        (2, 1, 0),
        (3, 2, 1),
        (4, 2, 1),
        (5, 3, 0),
        (6, 3, 1),
        (7, 1, 1),
        (8, 2, 0),
    ]
    paths = []
    for image_id, cls, _ in rows:
        rel = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{image_id:04d}.jpg"
        _jpeg(folder / "images" / rel, COLOURS[cls - 1], mode="L" if image_id == 7 else "RGB")
        paths.append(f"{image_id} {rel}")
    (folder / "images.txt").write_text("\n".join(paths) + "\n")
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in rows))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in rows))


def test_cub200_official_split_and_holdout(tmp_path) -> None:
    _write_cub(tmp_path)
    dm = CUB200(root=str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    assert (dm.num_classes, dm.input_shape) == (200, (3, 8, 8))
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert [int(train[i][1]) for i in range(len(train))] == [0, 1, 1, 2, 0]  # ids 1, 3, 4, 6, 7
    assert [int(val[i][1]) for i in range(len(val))] == [0, 2, 1]  # test ids 2, 5, 8
    x, _ = val[1]  # class 3 (label 2): blue
    assert torch.allclose(_mean_colour(x), torch.tensor([0.0, 0.0, 1.0]), atol=0.05)
    assert train[4][0].shape == (3, 8, 8)  # a grayscale file becomes three channels
    held = CUB200(root=str(tmp_path), image_size=8, val_fraction=0.4)
    held.setup("fit")
    assert (len(held.datasets["train"]), len(held.datasets["val"])) == (3, 2)  # 40 % of the 5 training images


def test_cub200_missing_and_malformed(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="train_test_split.txt") as info:
        CUB200(root=str(tmp_path)).setup("fit")
    assert "cub_200_2011" in str(info.value).lower() and "tar xzf" in str(info.value)
    _write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(ValueError, match="line 2"):
        CUB200(root=str(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------- unreadable files
@pytest.mark.parametrize(
    ("write", "build", "image"),
    [
        (
            lambda root: _write_caltech(root, per_class=5),
            lambda root: Caltech256(root=root, expected_num_classes=3, image_size=8),
            "caltech256/256_ObjectCategories/001.thing0/001_0001.jpg",
        ),
        (_write_flowers, lambda root: Flowers102(root=root, image_size=8), "flowers-102/jpg/image_00001.jpg"),
        (_write_cub, lambda root: CUB200(root=root, image_size=8), "CUB_200_2011/images/001.Bird_1/Bird_1_0001.jpg"),
    ],
    ids=["caltech256", "flowers102", "cub200"],
)
def test_truncated_image_file_is_named(tmp_path, write, build, image) -> None:
    """Every data module that reads image files names a truncated one (and the setting that skips it)."""
    write(tmp_path)
    path = tmp_path / image
    path.write_bytes(path.read_bytes()[:100])
    dm = build(str(tmp_path))
    dm.setup("fit")
    dataset = dm.datasets["train"]
    with pytest.raises(UnreadableImageError, match=f"cannot read the image file {path}: .*data.unreadable_images=skip"):
        for i in range(len(dataset)):
            dataset[i]


# ----------------------------------------------------------------------------- RandAugment switch
def test_randaugment_wraps_only_the_training_images() -> None:
    inner = Synthetic(input_shape=(3, 8, 8), num_classes=3, num_train=6, num_val=4, num_test=4, batch_size=3)
    dm = RandAugmented(data=inner, num_ops=2, magnitude=9)
    assert (dm.num_classes, dm.input_shape, dm.mean, dm.std, dm.batch_size) == (3, (3, 8, 8), inner.mean, inner.std, 3)
    dm.setup("fit")
    assert isinstance(inner.datasets["train"], RandAugmentDataset)
    assert not isinstance(inner.datasets["val"], RandAugmentDataset)
    dm.setup("fit")  # idempotent: not wrapped twice
    assert not isinstance(inner.datasets["train"].dataset, RandAugmentDataset)
    plain = Synthetic(input_shape=(3, 8, 8), num_classes=3, num_train=6, num_val=4, num_test=4)
    plain.setup("fit")
    torch.manual_seed(0)
    augmented = [inner.datasets["train"][i] for i in range(6)]
    changed = 0
    for i, (x, y) in enumerate(augmented):
        x0, y0 = plain.datasets["train"][i]
        assert int(y) == int(y0) and x.shape == x0.shape and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        changed += int(not torch.equal(x, x0))
    assert changed > 0
    x_val, _ = inner.datasets["val"][0]
    assert torch.equal(x_val, plain.datasets["val"][0][0])
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 8, 8)


def test_randaugment_bad_settings(tmp_path) -> None:
    inner = CIFAR10(root=str(tmp_path))
    with pytest.raises(ValueError, match="magnitude"):
        RandAugmented(data=inner, magnitude=31)
    with pytest.raises(ValueError, match="num_ops"):
        RandAugmented(data=inner, num_ops=0)
    with pytest.raises(TypeError, match="BaseDataModule"):
        RandAugmented(data=object())
