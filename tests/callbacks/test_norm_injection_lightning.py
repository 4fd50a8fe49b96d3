"""NormInjection inside a Trainer: timing vs. the optimizer, stages, checkpoints, logging, sync."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.callbacks.norm_injection import NormInjection
from normlightning.injection import restore_injection, store_injection
from normlightning.injection.spec import CHECKPOINT_KEY
from normlightning.norms import BatchGroupNorm, GroupNorm
from normlightning.norms.base import NormLayer
from normlightning.training.norm_sync import NormSync


class TinyTask(LightningModule):
    """A minimal task: conv-bn-relu-pool-linear, SGD with momentum built in configure_optimizers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        self.example_input_array = torch.zeros(2, 3, 4, 4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_save_checkpoint(self, checkpoint):
        store_injection(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        restore_injection(self, checkpoint)


def loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def trainer(tmp_path, callbacks, **kw) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kw)
    return Trainer(callbacks=callbacks, **defaults)


class OptimizerProbe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.model_params = {id(p) for p in pl_module.parameters()}
        self.norm_params = {id(p) for m in pl_module.modules() if isinstance(m, NormLayer) for p in m.parameters()}


def test_optimizer_sees_injected_parameters_and_stages_are_idempotent(tmp_path):
    task, probe = TinyTask(), OptimizerProbe()
    cb = NormInjection(method="bgn", num_groups=8)
    t = trainer(tmp_path, [cb, probe])
    t.fit(task, loader())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in task.modules())
    assert probe.norm_params and probe.norm_params <= probe.opt_params
    assert probe.opt_params == probe.model_params
    layers = [m for m in task.modules() if isinstance(m, NormLayer)]
    weights_after_fit = [m.weight.detach().clone() for m in layers]
    t.test(task, loader())  # setup(stage="test") runs again: nothing is replaced twice
    assert [m for m in task.modules() if isinstance(m, NormLayer)] == layers
    for m, w in zip(layers, weights_after_fit):
        torch.testing.assert_close(m.weight, w)


def test_checkpoint_stores_spec_and_load_from_checkpoint_rebuilds(tmp_path):
    task = TinyTask()
    cb = NormInjection(method="gn", num_groups=4, overrides=[{"pattern": r"net\.4", "method": "bgn", "num_groups": 8}])
    t = trainer(tmp_path, [cb])
    t.fit(task, loader())
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # the spec is plain data
    assert [(r["name"], r["method"]) for r in ckpt[CHECKPOINT_KEY]["layers"]] == [("net.1", "gn"), ("net.4", "bgn")]
    reloaded = TinyTask.load_from_checkpoint(path)  # no callback involved
    assert isinstance(reloaded.net[1], GroupNorm) and isinstance(reloaded.net[4], BatchGroupNorm)
    x = torch.rand(5, 3, 4, 4)
    task.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x), task(x), rtol=0, atol=0)


def test_summary_logged_to_tensorboard_as_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = NormInjection(method="gn", num_groups=2)
    trainer(tmp_path, [cb], logger=logger, max_steps=1).fit(TinyTask(), loader())
    assert "| net.1 | BatchNorm2d | GroupNorm (gn) |" in cb.summary_table().replace("  ", "")
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("norm_injection/summary/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "net.4" in text and "GroupNorm (gn)" in text and "num_groups=2" in text


class SyncProbe(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.types = [type(m) for m in pl_module.net]
        self.flags = [m.sync_statistics for m in pl_module.modules() if isinstance(m, NormLayer)]


@pytest.mark.parametrize("how", ["sync_batchnorm", "plugin"])
def test_sync_batchnorm_keeps_our_layers_and_syncs_them(tmp_path, how):
    """Lightning's sync_batchnorm converts _BatchNorm only: our layers survive, get sync_statistics."""
    import torch.distributed as dist

    cb, probe = NormInjection(method="bgn", num_groups=8), SyncProbe()
    kw = {"sync_batchnorm": True} if how == "sync_batchnorm" else {"plugins": [NormSync()]}
    task = TinyTask()
    try:
        trainer(tmp_path, [cb, probe], strategy="ddp", max_steps=1, **kw).fit(task, loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert probe.types[1] is BatchGroupNorm and probe.types[4] is BatchGroupNorm
    assert not any(issubclass(t, nn.modules.batchnorm._BatchNorm) for t in probe.types)
    assert probe.flags == [True, True]
    assert [m.sync_statistics for m in task.modules() if isinstance(m, NormLayer)] == [False, False]  # reverted


def test_sync_batchnorm_plugin_alone_does_not_touch_our_layers():
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    model = nn.Sequential(BatchGroupNorm(8, num_groups=2), nn.BatchNorm2d(8))
    converted = TorchSyncBatchNorm().apply(model)
    assert type(converted[0]) is BatchGroupNorm and converted[0] is model[0]
    assert type(converted[1]) is nn.SyncBatchNorm  # native BN is what it converts
