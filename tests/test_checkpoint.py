"""The CLI's Checkpoint: last.ckpt always holds the latest state, even when the monitored metric stalls."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.callbacks.checkpoint import Checkpoint
from normlightning.tasks import BaseTask


class ConstantMetricTask(BaseTask):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/metric", 1.0)  # never improves after the first epoch


def test_last_checkpoint_follows_the_run(tmp_path) -> None:
    loader = DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=4)
    checkpoint = Checkpoint(
        dirpath=tmp_path, monitor="val/metric", mode="max", save_last=True, save_top_k=1, filename="best-{epoch}"
    )
    trainer = Trainer(
        max_epochs=3,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ConstantMetricTask(), train_dataloaders=loader, val_dataloaders=loader)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6) and trainer.global_step == 6


class LastCheckpointProbe(Callback):
    """Reads last.ckpt's global_step before each training batch."""

    def __init__(self, path) -> None:
        self.path, self.seen = path, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.path.exists():
            self.seen[trainer.global_step] = torch.load(self.path, weights_only=True)["global_step"]


def test_last_checkpoint_follows_validations_inside_the_epoch(tmp_path) -> None:
    """With two validations per epoch, last.ckpt holds the state of the first one while the epoch goes on,
    and the end of the epoch at its end."""
    loader = DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=1)
    checkpoint = Checkpoint(dirpath=tmp_path, monitor="val/metric", mode="max", save_last=True, save_top_k=1)
    probe = LastCheckpointProbe(tmp_path / "last.ckpt")
    trainer = Trainer(
        max_epochs=1,
        val_check_interval=0.5,
        callbacks=[probe, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ConstantMetricTask(), train_dataloaders=loader, val_dataloaders=loader)
    assert probe.seen == {4: 4, 5: 4, 6: 4, 7: 4}  # written by the validation after batch 4
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (0, 8)
