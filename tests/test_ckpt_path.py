"""The command's --ckpt_path: `last` finds the run name's newest last.ckpt; `best`, a directory, another module's
checkpoint, another num_classes, a model: section without class_path and predict without a checkpoint are errors
that say what to pass."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from normlightning.ckpt_path import CheckpointPathError, run_checkpoint_folders
from normlightning.cli import build_cli, main

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def synthetic(runs: Path, num_classes: int = 2) -> list[str]:
    """A tiny run named `tiny` logging under `runs` (4 training steps per epoch)."""
    return [
        "--data=normlightning.data.Synthetic",
        "--data.input_shape=[1, 6, 6]",
        f"--data.num_classes={num_classes}",
        "--data.num_train=16",
        "--data.num_val=8",
        "--data.num_test=8",
        "--data.batch_size=4",
        "--model=normlightning.tasks.ClassificationTask",
        "--model.backbone=small_cnn",
        "--model.backbone_kwargs={width: 4}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        f"--trainer.logger.init_args.save_dir={runs}",
        "--trainer.logger.init_args.name=tiny",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """`runs/` after one epoch of `fit`: runs/tiny/version_0/checkpoints/{best-epoch000-step4,last}.ckpt."""
    runs = tmp_path_factory.mktemp("ckpt_path") / "runs"
    build_cli(["fit", *synthetic(runs)])
    assert sorted(p.name for p in (runs / "tiny" / "version_0" / "checkpoints").iterdir()) == [
        "best-epoch000-step4.ckpt",
        "last.ckpt",
    ]
    return runs


def test_fit_ckpt_path_last_resumes_the_newest_last_ckpt_of_the_run_name(runs, lightning_info) -> None:
    last = runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    cli = build_cli(["fit", *synthetic(runs), "--ckpt_path=last", "--trainer.max_epochs=2"])
    assert cli.trainer.ckpt_path == str(last)  # resumed, in a new folder (version_1)
    assert any(f"--ckpt_path last: resuming from {last}" in message for message in lightning_info), lightning_info
    resumed = torch.load(runs / "tiny" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 8)  # epoch 0 from version_0, epoch 1 here


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(tmp_path) -> None:
    expected = (
        re.escape(f"no last.ckpt in {tmp_path}/tiny/version_<n>/checkpoints")
        + ".*"
        + re.escape(f"--ckpt_path {tmp_path}/tiny/version_<n>/checkpoints/last.ckpt")
    )
    with pytest.raises(CheckpointPathError, match=expected):
        build_cli(["fit", *synthetic(tmp_path), "--ckpt_path=last"])


def test_ckpt_path_best_in_a_new_process_gives_the_file_form(runs) -> None:
    with pytest.raises(
        CheckpointPathError,
        match=r"--ckpt_path best names the best checkpoint of a fit that ran "
        r"earlier in this same Python process.*--ckpt_path .*/tiny/version_\d/checkpoints/"
        r"best-epoch00\d-step\d\.ckpt\)$",
    ):
        build_cli(["test", *synthetic(runs), "--ckpt_path=best"])


def test_ckpt_path_directory_lists_its_checkpoints(runs) -> None:
    folder = runs / "tiny" / "version_0"
    expected = (
        re.escape(f"--ckpt_path '{folder}' is a directory")
        + "(?s:.*)"
        + re.escape(f"{folder}/checkpoints/best-epoch000-step4.ckpt\n  {folder}/checkpoints/last.ckpt")
    )
    with pytest.raises(CheckpointPathError, match=expected):
        build_cli(["test", *synthetic(runs), f"--ckpt_path={folder}"])


def test_checkpoint_with_another_num_classes_names_both(runs) -> None:
    last = runs / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointPathError, match="trained with num_classes=2, but the data has num_classes=3"):
        build_cli(["test", *synthetic(runs, num_classes=3), f"--ckpt_path={last}"])


class OtherModule(LightningModule):
    """Someone else's LightningModule."""

    def __init__(self, hidden: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, hidden)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_of_another_lightning_module_is_named(runs, tmp_path) -> None:
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(OtherModule(), DataLoader(TensorDataset(torch.rand(4, 2)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(
        CheckpointPathError,
        match=r"is not a normlightning task checkpoint: it was written by another "
        r"LightningModule \(the file does not record its class; its hyperparameters: \['hidden'\]",
    ):
        build_cli(["test", *synthetic(runs), f"--ckpt_path={tmp_path / 'other.ckpt'}"])

    # a checkpoint written through another LightningCLI records the class
    checkpoint = torch.load(tmp_path / "other.ckpt", weights_only=False)
    checkpoint["hyper_parameters"]["_class_path"] = "lightning.pytorch.demos.boring_classes.BoringModel"
    torch.save(checkpoint, tmp_path / "boring.ckpt")
    with pytest.raises(
        CheckpointPathError,
        match=r"it was written by lightning\.pytorch\.demos\.boring_classes\."
        r"BoringModel, which is not a normlightning task",
    ):
        build_cli(["test", *synthetic(runs), f"--ckpt_path={tmp_path / 'boring.ckpt'}"])


@pytest.mark.parametrize(
    ("section", "config"),
    [
        (
            "model",
            "model:\n  backbone: small_cnn\n  backbone_kwargs:\n    width: 4\n"
            "data:\n  class_path: normlightning.data.Digits\n",
        ),
        ("data", "model:\n  class_path: normlightning.tasks.ClassificationTask\ndata:\n  batch_size: 8\n"),
    ],
    ids=["model", "data"],
)
def test_section_without_class_path_is_named(tmp_path, capsys, section, config) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path)])
    assert info.value.code == 2
    assert f"error: the {section}: section has no class_path" in capsys.readouterr().err


def test_predict_without_ckpt_path_needs_allow_untrained(runs) -> None:
    with pytest.raises(
        CheckpointPathError,
        match=r"predict without --ckpt_path would predict with the model's initial "
        r"weights.*--allow_untrained=true",
    ):
        build_cli(["predict", *synthetic(runs)])


def test_run_checkpoint_folders_follow_the_run_settings(tmp_path) -> None:
    """Where `last` looks: checkpoint.dirpath; else the logger's save_dir/name/<version>/checkpoints (only the set
    version); without a logger default_root_dir/checkpoints; a logger without a local folder: nowhere."""
    for version in ("version_0", "version_1", "other"):
        (tmp_path / "runs" / "tiny" / version).mkdir(parents=True)
    tensorboard = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"},
    }
    folders, pattern = run_checkpoint_folders({"trainer": {"logger": tensorboard}})
    names = ["other", "version_0", "version_1"]
    assert folders == [tmp_path / "runs" / "tiny" / name / "checkpoints" for name in names]
    assert pattern == f"{tmp_path}/runs/tiny/version_<n>/checkpoints"
    tensorboard["init_args"]["version"] = 1
    assert run_checkpoint_folders({"trainer": {"logger": tensorboard}})[0] == [
        tmp_path / "runs" / "tiny" / "version_1" / "checkpoints"
    ]
    assert run_checkpoint_folders({"trainer": {"logger": tensorboard}, "checkpoint": {"dirpath": "ckpts"}})[0] == [
        Path("ckpts")
    ]
    assert run_checkpoint_folders({"trainer": {"logger": False, "default_root_dir": str(tmp_path)}})[0] == [
        tmp_path / "checkpoints"
    ]
    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "p"}}
    assert run_checkpoint_folders({"trainer": {"logger": wandb}}) == ([], "<the logger's run folder>/checkpoints")
