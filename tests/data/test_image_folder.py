"""ImageFolderDataModule and ImageNet against JPEG class folders."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from normlightning.data import DatasetNotFoundError, ImageFolderDataModule, ImageNet


def test_image_folder_reads_jpegs(tmp_path, write_image_folders) -> None:
    classes = write_image_folders(tmp_path, per_class=2)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, num_workers=0, batch_size=3)
    assert dm.classes == sorted(classes) and dm.num_classes == 3 and dm.input_shape == (3, 16, 16)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["test"]) == 6  # test defaults to val/
    x, y = dm.datasets["test"][0]  # first image of class 0 ("cat", pure red)
    assert x.shape == (3, 16, 16) and int(y) == 0
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=0.05)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (3, 3, 16, 16) and float(xb.max()) <= 1.0


def test_image_folder_val_fraction_without_val_dir(tmp_path, write_image_folders) -> None:
    write_image_folders(tmp_path, splits=("train",), per_class=4)
    dm = ImageFolderDataModule(root=str(tmp_path), val_dir=None, val_fraction=0.25, image_size=8, num_workers=0)
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (9, 3)
    with pytest.raises(ValueError, match="val_fraction"):
        ImageFolderDataModule(root=str(tmp_path), val_dir=None)


def test_image_folder_with_a_single_class_is_refused_naming_the_folder(tmp_path, write_image_folders) -> None:
    write_image_folders(tmp_path, classes=("cat",))
    folder = re.escape(str(tmp_path / "train"))
    with pytest.raises(ValueError, match=rf"{folder} has 1 class folder \(cat\); .* at least 2"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8, num_workers=0)


def test_imagenet_layout_errors(tmp_path, write_image_folders) -> None:
    with pytest.raises(DatasetNotFoundError, match="train/<class_name>") as info:
        ImageNet(root=str(tmp_path / "nowhere"))
    assert "image-net.org" in str(info.value) and "valprep" in str(info.value)
    write_image_folders(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="expected 1000"):
        ImageNet(root=str(tmp_path))
    dm = ImageNet(root=str(tmp_path), expected_num_classes=3, image_size=8, num_workers=0)
    shutil.rmtree(tmp_path / "val" / "eel")
    with pytest.raises(DatasetNotFoundError, match="missing \\['eel'\\]"):
        dm.setup("fit")


def test_imagenet_transforms_sizes(tmp_path, write_image_folders) -> None:
    write_image_folders(tmp_path, per_class=1)
    dm = ImageNet(root=str(tmp_path), expected_num_classes=3, image_size=24, num_workers=0)
    dm.setup("fit")
    assert dm.datasets["train"][0][0].shape == (3, 24, 24)
    assert dm.datasets["val"][0][0].shape == (3, 24, 24)


def _write_ramp_folders(root, width: int, height: int) -> None:
    """``root/{train,val}/{a,b}/0.png``: a grey image whose value is ``8 * column`` (a horizontal ramp); class
    ``a`` is item 0 of each split (a second class because one class is refused)."""
    import numpy as np
    from PIL import Image

    ramp = np.repeat((8 * np.arange(width, dtype=np.uint8))[None, :, None], 3, axis=2)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(np.repeat(ramp, height, axis=0)).save(root / split / label / "0.png")


def test_imagenet_eval_resize_mode_square(tmp_path, write_image_folders) -> None:
    """HN §4.4 evaluation: "resized to 256x256, and then cropped by 224x224 at the center" (eval_resize_mode:
    square), against the short-side resize (aspect ratio kept), on a 32x16 horizontal ramp, resize 16, crop 8.

    Square: 32 -> 16 columns (scale 2): resized column j samples source column 2j + 0.5, value 8 (2j + 0.5);
    the center crop keeps j = 4..11. Short side: 16 is already the short side, the crop keeps columns 12..19.
    """
    _write_ramp_folders(tmp_path, width=32, height=16)
    columns = torch.arange(8, dtype=torch.float32)
    square = ImageNet(
        root=str(tmp_path), expected_num_classes=2, image_size=8, resize=16, eval_resize_mode="square", num_workers=0
    )
    square.setup("fit")
    x = square.datasets["val"][0][0] * 255
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[0, 3], 8 * (2 * (columns + 4) + 0.5), atol=1.0)
    short = ImageNet(root=str(tmp_path), expected_num_classes=2, image_size=8, resize=16, num_workers=0)
    assert short.eval_resize_mode == "short_side"
    short.setup("fit")
    assert torch.allclose(short.datasets["val"][0][0][0, 3] * 255, 8 * (columns + 12), atol=1.0)
    with pytest.raises(ValueError, match="eval_resize_mode"):
        ImageNet(root=str(tmp_path), expected_num_classes=2, eval_resize_mode="stretch")
