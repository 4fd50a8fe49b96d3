"""The CLI's Checkpoint: last.ckpt always holds the latest state, even when the monitored metric stalls."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
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
