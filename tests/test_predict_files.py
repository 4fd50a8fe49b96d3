"""``normlightning predict --data.predict_root <folder>``: every image file under the folder, read with the
DataModule's evaluation transform, one CSV row per file with its relative path, the predicted class and
its name; test-split predictions carry class names too; an unreadable file or an empty folder is an
error naming the folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from normlightning.cli import build_cli
from normlightning.data import Digits
from normlightning.data.transforms import imagenet_eval

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]
IMAGE_FOLDER = [
    "--data=normlightning.data.ImageFolderDataModule",
    "--data.image_size=16",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 4}",
    "--trainer.logger.init_args.name=run",
]


@pytest.fixture
def fitted(run_dir: Path, write_image_folders) -> tuple[list[str], Path]:
    """Class names and the last.ckpt of a 1-step fit on a 3-class image folder (root ``data/``)."""
    classes = write_image_folders(run_dir / "data")
    build_cli(
        ["fit", *IMAGE_FOLDER, *QUIET, "--data.root=data", "--trainer.max_steps=1", "--trainer.limit_val_batches=1"]
    )
    return classes, run_dir / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_root_rows_name_each_file_and_its_classes(run_dir, fitted, lightning_info) -> None:
    classes, ckpt = fitted
    new = run_dir / "new images"
    (new / "deeper").mkdir(parents=True)
    Image.new("RGB", (50, 24), (250, 10, 10)).save(new / "red.png")
    Image.new("L", (20, 33), 128).save(new / "deeper" / "grey.JPG")  # grayscale, upper-case extension
    (new / "notes.txt").write_text("not an image")
    cli = build_cli(
        [
            "predict",
            *IMAGE_FOLDER,
            *QUIET,
            "--data.root=data",
            f"--data.predict_root={new}",
            f"--ckpt_path={ckpt}",
            "--predictions.top_k=2",
            "--predictions.format=both",
        ]
    )
    folder = run_dir / "runs" / "run" / "version_1"
    rows = _rows(folder / "predictions.csv")
    assert list(rows[0]) == [
        "path",
        "predicted_class",
        "predicted_name",
        "top1_class",
        "top1_name",
        "top1_prob",
        "top2_class",
        "top2_name",
        "top2_prob",
    ]
    assert [row["path"] for row in rows] == ["deeper/grey.JPG", "red.png"]  # recursive, sorted, .txt skipped
    assert any("2 image files" in m and "1 other files skipped" in m for m in lightning_info), lightning_info
    # independent recomputation: each file through PIL -> RGB -> the ImageNet evaluation pipeline at 16 px
    with Image.open(new / "deeper" / "grey.JPG") as grey, Image.open(new / "red.png") as red:
        x = torch.stack([imagenet_eval(16)(image.convert("RGB")) for image in (grey, red)])
    with torch.no_grad():
        probabilities = cli.model.eval()(x).softmax(dim=-1)
    for row, p in zip(rows, probabilities):
        ranked = p.sort(descending=True)
        assert int(row["predicted_class"]) == int(ranked.indices[0]) == int(row["top1_class"])
        assert row["predicted_name"] == classes[int(ranked.indices[0])] == row["top1_name"]
        assert row["top2_name"] == classes[int(ranked.indices[1])]
        assert float(row["top2_prob"]) == pytest.approx(float(ranked.values[1]), rel=1e-5)
    saved = torch.load(folder / "predictions.pt")
    assert saved["paths"] == ["deeper/grey.JPG", "red.png"] and saved["class_names"] == classes
    torch.testing.assert_close(saved["probabilities"], probabilities)


def test_test_split_predictions_carry_class_names(run_dir, write_image_folders) -> None:
    classes = write_image_folders(run_dir / "data")
    build_cli(["predict", *IMAGE_FOLDER, *QUIET, "--data.root=data", "--predictions.top_k=1", "--allow_untrained=true"])
    rows = _rows(run_dir / "runs" / "run" / "version_0" / "predictions.csv")
    assert list(rows[0]) == [
        "index",
        "target",
        "target_name",
        "predicted_class",
        "predicted_name",
        "top1_class",
        "top1_name",
        "top1_prob",
    ]
    # the val split (no test_dir): sorted class folders, 2 images each
    assert [row["target_name"] for row in rows] == [name for name in classes for _ in range(2)]
    assert all(row["predicted_name"] == classes[int(row["predicted_class"])] for row in rows)


def test_unreadable_file_is_an_error_naming_the_folder(run_dir, write_image_folders) -> None:
    write_image_folders(run_dir / "data")
    broken = run_dir / "broken"
    broken.mkdir()
    Image.new("RGB", (8, 8)).save(broken / "fine.png")
    (broken / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=rf"data.predict_root='{broken}': cannot read cut.jpg as an image"):
        build_cli(
            [
                "predict",
                *IMAGE_FOLDER,
                *QUIET,
                "--data.root=data",
                f"--data.predict_root={broken}",
                "--allow_untrained=true",
            ]
        )
    assert not list(run_dir.glob("runs/run/version_*/predictions.csv"))  # nothing written


def test_empty_or_missing_folder_is_an_error_naming_it(tmp_path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=rf"data.predict_root='{empty}' holds no image file .*\(1 other files\)"):
        Digits(predict_root=str(empty)).setup("predict")
    with pytest.raises(ValueError, match=r"data.predict_root='.*missing' is not a folder"):
        Digits(predict_root=str(tmp_path / "missing")).setup("predict")


def test_default_file_transform_converts_mode_and_size_to_the_input_shape(tmp_path) -> None:
    """Digits (1, 8, 8): an RGB file becomes grayscale, L = (299 R + 587 G + 114 B) / 1000 (PIL's ITU-R 601-2
    luma), scaled to [0, 1]; a 16x16 file of one colour is resized to 8x8 of that colour."""
    Image.new("RGB", (8, 8), (200, 100, 50)).save(tmp_path / "a.png")
    Image.new("L", (16, 16), 40).save(tmp_path / "b.png")
    data = Digits(predict_root=str(tmp_path))
    data.setup("predict")
    (x,) = next(iter(data.predict_dataloader()))
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
    luma = round((299 * 200 + 587 * 100 + 114 * 50) / 1000)
    torch.testing.assert_close(x[0], torch.full((1, 8, 8), luma / 255))
    torch.testing.assert_close(x[1], torch.full((1, 8, 8), 40 / 255))


def test_cifar_class_names_come_from_its_meta_file(tmp_path, write_cifar) -> None:
    from normlightning.data import CIFAR10, CIFAR100

    assert CIFAR10(root=str(tmp_path / "none")).class_names is None  # no files yet: no names
    write_cifar(tmp_path / "ten")
    assert CIFAR10(root=str(tmp_path / "ten")).class_names == [f"class{i}" for i in range(10)]
    write_cifar(tmp_path / "hundred", num_classes=100)
    assert CIFAR100(root=str(tmp_path / "hundred")).class_names == [f"c{i}" for i in range(100)]  # the fine labels
