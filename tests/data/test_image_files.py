"""Image files of every PIL mode a folder may hold -> 8-bit RGB with hand-computed values; an unreadable file
is named, or skipped and counted with ``unreadable_images=skip``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from normlightning.data import ImageFolderDataModule, MiniImageNet
from normlightning.data.errors import UnreadableImageError
from normlightning.data.rgb_images import load_rgb_image

SIXTEEN_BIT = [0, 128, 129, 257, 32896, 65535]
#: round(v * 255 / 65535): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 257 -> 1, 32896 -> 128, 65535 -> 255
SIXTEEN_BIT_AS_8 = [0, 0, 1, 1, 128, 255]


def gray(values: list[int]) -> list[list[int]]:
    return [[v, v, v] for v in values]


def palette_image(mode: str) -> Image.Image:
    image = Image.frombytes(mode, (2, 1), bytes([1, 0]) if mode == "P" else bytes([1, 255, 0, 0]))
    image.putpalette([255, 0, 0, 0, 128, 255])  # index 0: (255, 0, 0), index 1: (0, 128, 255)
    return image


def image_16_bit(mode: str) -> Image.Image:
    values = np.array(SIXTEEN_BIT, dtype="<u2" if mode == "I;16" else ">u2")  # I;16 little-, I;16B big-endian
    return Image.frombytes(mode, (len(SIXTEEN_BIT), 1), values.tobytes())


# (mode, file format, image, expected RGB pixels, computed by hand)
CASES = [
    ("1", "png", Image.frombytes("1", (2, 1), bytes([0b01000000])), gray([0, 255])),
    ("L", "png", Image.frombytes("L", (3, 1), bytes([0, 77, 255])), gray([0, 77, 255])),
    ("LA", "png", Image.frombytes("LA", (2, 1), bytes([10, 0, 200, 255])), gray([10, 200])),  # alpha dropped
    ("P", "png", palette_image("P"), [[0, 128, 255], [255, 0, 0]]),
    ("PA", "tiff", palette_image("PA"), [[0, 128, 255], [255, 0, 0]]),
    ("RGB", "png", Image.frombytes("RGB", (2, 1), bytes([1, 2, 3, 250, 128, 0])), [[1, 2, 3], [250, 128, 0]]),
    ("RGBA", "png", Image.frombytes("RGBA", (2, 1), bytes([1, 2, 3, 0, 250, 128, 0, 9])), [[1, 2, 3], [250, 128, 0]]),
    # CMYK -> RGB: R = (255 - C)(255 - K) / 255: (100, 50, 0, 51) -> (155 * 204, 205 * 204, 255 * 204) / 255
    (
        "CMYK",
        "tiff",
        Image.frombytes("CMYK", (2, 1), bytes([100, 50, 0, 51, 0, 0, 0, 0])),
        [[124, 164, 204], [255, 255, 255]],
    ),
    # JPEG's YCbCr: R = Y + 1.402 (Cr - 128), G = Y - 0.344136 (Cb - 128) - 0.714136 (Cr - 128),
    # B = Y + 1.772 (Cb - 128)
    # (76, 85, 255) -> (254.05, 0.10, -0.20) -> (254, 0, 0)
    (
        "YCbCr",
        "tiff",
        Image.frombytes("YCbCr", (2, 1), bytes([76, 85, 255, 128, 128, 128])),
        [[254, 0, 0], [128, 128, 128]],
    ),
    ("I;16", "png", image_16_bit("I;16"), gray(SIXTEEN_BIT_AS_8)),
    ("I;16B", "tiff", image_16_bit("I;16B"), gray(SIXTEEN_BIT_AS_8)),
    ("I", "tiff", Image.fromarray(np.array([SIXTEEN_BIT], dtype=np.int32)), gray(SIXTEEN_BIT_AS_8)),
    # F read as 0..1: round(v * 255): 0.25 -> 63.75 -> 64, 0.5019 -> 127.98 -> 128
    ("F", "tiff", Image.fromarray(np.array([[0.0, 0.25, 0.5019, 1.0]], dtype=np.float32)), gray([0, 64, 128, 255])),
]


@pytest.mark.parametrize(("mode", "file_format", "image", "expected"), CASES, ids=[case[0] for case in CASES])
def test_every_pil_mode_reads_as_scaled_8_bit_rgb(tmp_path, mode, file_format, image, expected) -> None:
    path = tmp_path / f"image.{file_format}"
    if mode == "P":
        image.info["transparency"] = 0  # a palette with a transparent colour, as GIFs and PNGs have
    image.save(path)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds this mode
    rgb = load_rgb_image(path)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb).tolist() == [expected]


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), r"mode I with values in \[0, 70000\]"),
        (Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)), r"mode F with values in \[0.0, 2.0\]"),
        (Image.new("LAB", (2, 1)), "mode LAB is not read"),
    ],
    ids=["I-above-16-bit", "F-above-1", "LAB"],
)
def test_modes_without_a_known_scaling_are_named_errors(tmp_path, image, problem) -> None:
    path = tmp_path / "odd.tiff"
    image.save(path)
    with pytest.raises(UnreadableImageError, match=f"{path}.*{problem}.*data.unreadable_images=skip"):
        load_rgb_image(path)


def test_image_folder_scales_16_bit_png(tmp_path, write_image_folders) -> None:
    """A 16-bit grayscale PNG at 32896 of 65535 is mid-gray (128 / 255), not white as PIL's convert("RGB") makes it."""
    write_image_folders(tmp_path, per_class=1)
    Image.fromarray(np.full((30, 40), 32896, dtype=np.uint16)).save(tmp_path / "val" / "cat" / "0.png")
    (tmp_path / "val" / "cat" / "0.jpg").unlink()
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, num_workers=0)
    dm.setup("validate")
    x, y = dm.datasets["val"][0]
    assert int(y) == 0 and torch.allclose(x, torch.full((3, 8, 8), 128 / 255))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_jpeg_is_named(tmp_path, write_image_folders) -> None:
    write_image_folders(tmp_path)
    truncate(tmp_path / "val" / "cat" / "1.jpg")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, num_workers=0, batch_size=6)
    dm.setup("validate")
    bad = tmp_path / "val" / "cat" / "1.jpg"
    expected = f"{bad}: OSError: Truncated File Read.*set data.unreadable_images=skip"
    with pytest.raises(UnreadableImageError, match=expected):
        next(iter(dm.val_dataloader()))


def test_unreadable_images_skip_uses_the_next_image_and_counts(tmp_path, write_image_folders) -> None:
    """val/ holds cat/0, cat/1, dog/0, dog/1, eel/0, eel/1 (labels 0 0 1 1 2 2); cat/1 is truncated, so item 1 is
    dog/0 (label 1) and the batch keeps its 6 images. The count is seen across a loader worker process."""
    write_image_folders(tmp_path)
    bad = tmp_path / "val" / "cat" / "1.jpg"
    truncate(bad)
    with pytest.raises(ValueError, match="unreadable_images must be one of"):
        ImageFolderDataModule(root=str(tmp_path), unreadable_images="ignore")

    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, num_workers=0, batch_size=6, unreadable_images="skip")
    dm.setup("validate")
    with pytest.warns(UserWarning, match=f"skipped val item 1: cannot read the image file {bad}"):
        x, y = dm.datasets["val"][1]
    assert int(y) == 1 and torch.allclose(x.mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=0.05)  # dog: green

    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, num_workers=1, batch_size=6, unreadable_images="skip")
    dm.setup("validate")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert dm.datasets["val"].num_skipped == 1  # flagged in the worker, seen here
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) of the val split skipped \(items 1\)"):
        dm.teardown("validate")


def test_unreadable_images_skip_wraps_a_shared_split_once(tmp_path, write_image_folders) -> None:
    """Without val/ and test/, the test split is the held-out val split: one skipping wrapper, one count."""
    write_image_folders(tmp_path, splits=("train",), per_class=4)
    dm = ImageFolderDataModule(
        root=str(tmp_path), val_dir=None, val_fraction=0.25, image_size=8, num_workers=0, unreadable_images="skip"
    )
    dm.setup("fit")
    dm.setup("test")
    assert dm.datasets["test"] is dm.datasets["val"] and isinstance(dm.datasets["val"].dataset, Subset)


def test_few_shot_episodes_refuse_skip(tmp_path) -> None:
    """A skipped image would be replaced by the next one, of another class: episodes keep `error`."""
    with pytest.raises(ValueError, match="data.unreadable_images=skip is not available for episodes"):
        MiniImageNet(root=str(tmp_path), unreadable_images="skip")
