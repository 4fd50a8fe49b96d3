"""The end of ``fit`` prints the run folder, the best checkpoint with its metric value and epoch, and
``last.ckpt``; ``test``/``validate`` print their metrics and the folder they were logged to. Each printed
line is checked against the files the run left (its ``metrics.csv``, the checkpoints' stored epoch)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from normlightning.cli import build_cli

RUN = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[1, 6, 6]",
    "--data.num_classes=3",
    "--data.num_train=24",
    "--data.num_val=24",
    "--data.num_test=10",
    "--data.batch_size=8",
    "--data.noise_std=0.5",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 4}",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
    "--trainer.logger.save_dir=logs",
]


def _logged(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_then_test_print_where_things_went(run_dir, capsys) -> None:
    build_cli(["fit", *RUN, "--trainer.max_epochs=3"])
    out = capsys.readouterr().out
    folder = run_dir / "logs" / "default" / "version_0"
    fit = re.search(
        r"normlightning fit: done \((\d+) optimizer steps.*\n  run folder: +(.+)\n"
        r"  best checkpoint: (.+) \(val/acc1=([\d.]+) at epoch (\d+)\)\n  last checkpoint: (.+)\n",
        out,
    )
    assert fit, out
    steps, printed_folder, best, value, epoch, last = fit.groups()
    assert Path(printed_folder).resolve() == folder.resolve() and int(steps) == 3 * 3
    # the best epoch and value: the first epoch of the highest val/acc1 in metrics.csv (mode max keeps the first)
    val = [(float(row["val/acc1"]), int(row["epoch"])) for row in _logged(folder) if row.get("val/acc1")]
    assert len(val) == 3
    best_value = max(v for v, _ in val)
    assert float(value) == pytest.approx(best_value, abs=5e-5)
    assert int(epoch) == min(e for v, e in val if v == best_value)
    assert torch.load(best, weights_only=True)["epoch"] == int(epoch)  # the file holds that epoch's weights
    assert Path(last).resolve() == (folder / "checkpoints" / "last.ckpt").resolve()
    assert torch.load(last, weights_only=True)["epoch"] == 2

    build_cli(["test", *RUN, f"--ckpt_path={best}"])
    out = capsys.readouterr().out
    test = re.search(r"normlightning test: (.+) \(weights: (.+)\)\n  logged to: (.+)\n", out)
    assert test, out
    metrics = dict(item.split("=") for item in test.group(1).split(", "))
    assert test.group(2) == best
    test_folder = run_dir / "logs" / "default" / "version_1"
    assert Path(test.group(3)).resolve() == test_folder.resolve()
    (row,) = [row for row in _logged(test_folder) if row.get("test/acc1")]
    assert set(metrics) == {key for key, value in row.items() if key.startswith("test/") and value}
    for key, value in metrics.items():
        assert float(value) == pytest.approx(float(row[key]), rel=5e-4)


def test_fit_summary_says_why_there_is_no_checkpoint(tmp_path) -> None:
    from lightning.pytorch import Trainer

    from normlightning.run_summary import fit_summary

    quick = Trainer(fast_dev_run=True, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    assert fit_summary(quick)[1:] == [
        f"  run folder:      none (no logger; default_root_dir {tmp_path})",
        "  checkpoints:     none (trainer.fast_dev_run saves no checkpoint)",
    ]
    unchecked = Trainer(enable_checkpointing=False, logger=False, default_root_dir=tmp_path)
    assert fit_summary(unchecked)[-1] == "  checkpoints:     none (trainer.enable_checkpointing=false)"
