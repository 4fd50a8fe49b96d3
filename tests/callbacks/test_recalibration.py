"""Tests of recalibrate_statistics / Recalibration: running stats == hand-computed cumulative mean."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint as LightningCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.callbacks.checkpoint import Checkpoint
from normlightning.callbacks.recalibration import Recalibration, batch_statistic_layers, recalibrate_statistics
from normlightning.evaluation.accuracy import evaluate_accuracy


def _batches(k: int, n: int = 4, shift: float = 3.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, 2, 2, generator=g) * (1 + i) + shift * i, torch.randint(0, 2, (n,), generator=g))
        for i in range(k)
    ]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.Dropout(0.5),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 2),
        nn.BatchNorm1d(2),
    )


def _expected(inputs: list[torch.Tensor], dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative average: mean of batch means, mean of unbiased batch variances."""
    means = torch.stack([x.mean(dim=dims) for x in inputs])
    variances = torch.stack([x.var(dim=dims, unbiased=True) for x in inputs])
    return means.mean(0), variances.mean(0)


def test_native_bn_cumulative_average_weights_and_modes_untouched():
    model = _net()
    model.train()
    model[6].eval()  # a mixed state that must come back as it was
    batches = _batches(5)
    params = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():  # BN inputs with dropout OFF: every module but the norms is in eval()
        conv_out = [model[0](x) for x, _ in batches[:3]]
    used = recalibrate_statistics(model, batches, num_batches=3)
    assert used == 3
    mean, var = _expected(conv_out, (0, 2, 3))
    torch.testing.assert_close(model[2].running_mean, mean)
    torch.testing.assert_close(model[2].running_var, var)
    assert int(model[2].num_batches_tracked) == 3
    # the second BN sees the first BN's *batch*-normalized output (train mode) of each batch
    with torch.no_grad():
        fc_in = [
            torch.relu(nn.functional.batch_norm(c, None, None, model[2].weight, model[2].bias, True)).flatten(1)
            for c in conv_out
        ]
        fc_out = [model[5](f) for f in fc_in]
    mean1, var1 = _expected(fc_out, (0,))
    torch.testing.assert_close(model[6].running_mean, mean1)
    torch.testing.assert_close(model[6].running_var, var1)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    assert model[2].momentum == 0.1 and model[6].momentum == 0.1
    assert [m.training for m in model] == [True, True, True, True, True, True, False]


def test_layer_discovery_and_errors():
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2, track_running_stats=False), nn.GroupNorm(1, 2))
    assert list(batch_statistic_layers(model)) == ["0"]
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_statistics(model, [torch.randn(4, 2)], num_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_statistics(model, [])


def test_failure_restores_buffers():
    model = nn.Sequential(nn.BatchNorm1d(2))
    model.train()
    model(torch.randn(8, 2) + 4)  # non-trivial running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def forward_fn(m, batch):
        if batch == "boom":
            raise RuntimeError("boom")
        return m(batch)

    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_statistics(model, [torch.randn(4, 2), "boom"], forward_fn=forward_fn)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model[0].momentum == 0.1 and model.training


class _Logger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = {}

    name = "rec"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


class _Task(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2), nn.BatchNorm1d(2, momentum=0.5))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_callback_at_train_end_with_accuracy(tmp_path, lightning_info):
    batches = _batches(4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    logger = _Logger()
    cb = Recalibration(num_batches=3, when="train_end", report_accuracy=True)
    task = _Task()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[cb],
    )
    trainer.fit(task, loader, loader)
    bn = task.net[2]
    with torch.no_grad():
        fc_out = [task.net[1](task.net[0](b[0])) for b in batches[:3]]
    mean, var = _expected(fc_out, (0,))
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.5
    assert logger.metrics["recalibration/num_batches"] == 3.0
    # accuracy after: argmax of eval-mode logits, counted by hand
    with torch.no_grad():
        task.eval()
        acc = (task(x).argmax(1) == y).float().mean().item()
    assert logger.metrics["recalibration/acc_after"] == pytest.approx(acc)
    assert evaluate_accuracy(task, loader) == pytest.approx(acc)
    assert 0.0 <= logger.metrics["recalibration/acc_before"] <= 1.0
    before, after = logger.metrics["recalibration/acc_before"], logger.metrics["recalibration/acc_after"]
    lines = [m for m in lightning_info if m.startswith("Recalibration:")]
    assert len(lines) == 1 and lines[0].startswith("Recalibration: 3 batches in ")
    assert lines[0].endswith(f" s, val acc {before:.4f} -> {after:.4f}")


def test_default_uses_a_short_loader_whole_without_warning_and_an_explicit_count_warns(tmp_path, recwarn):
    """``num_batches`` unset: up to 100 batches, all 4 of this loader and no warning (the statistics are the
    cumulative average over the 4); an explicit 6 warns that the loader had 4."""
    batches = _batches(4)
    loader = DataLoader(
        TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=4,
        shuffle=False,
    )
    for num_batches, warns in ((None, False), (6, True)):
        logger = _Logger()
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[Recalibration(num_batches=num_batches)],
        )
        task = _Task()
        recwarn.clear()
        trainer.fit(task, loader)
        with torch.no_grad():
            mean, var = _expected([task.net[1](task.net[0](b[0])) for b in batches], (0,))
        torch.testing.assert_close(task.net[2].running_mean, mean)
        torch.testing.assert_close(task.net[2].running_var, var)
        assert logger.metrics["recalibration/num_batches"] == 4.0
        asked = [str(w.message) for w in recwarn if "asked for" in str(w.message)]
        assert asked == (["recalibrate_statistics: asked for 6 batches, the loader had 4."] if warns else [])


def test_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="when="):
        Recalibration(when="sometime")
    with pytest.raises(ValueError, match="num_batches"):
        Recalibration(num_batches=-1)


# ------------------------------------------------------------------ normlightning layers
def _ghost_stats(x: torch.Tensor, ghosts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ghost batch j = samples n = j (mod G); mean of ghost means, mean of unbiased ghost vars."""
    parts = [x[j::ghosts] for j in range(ghosts)]
    return (
        torch.stack([p.mean(dim=(0, 2, 3)) for p in parts]).mean(0),
        torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in parts]).mean(0),
    )


@pytest.mark.parametrize("name", ["bn", "ghost", "bgn", "gbgn", "brn"])
def test_normlightning_layers_cumulative_average(name):
    from normlightning.norms import build_norm

    kwargs = {"ghost": {"num_groups": 2}, "bgn": {"num_groups": 2}}.get(name, {})
    model = nn.Sequential(build_norm(name, 3, **kwargs))
    layer = model[0]
    model.train()
    for _ in range(3):  # some history, and brn's schedule counter moves to 3
        model(torch.randn(4, 3, 2, 2) * 5 + 1)
    others = {
        k: v.clone()
        for k, v in layer.state_dict().items()
        if k not in {"running_mean", "running_var", "moving_x", "moving_x2", "num_batches_tracked"}
    }
    momentum = layer.momentum
    xs = [b[0] for b in _batches(3)]
    assert recalibrate_statistics(model, xs) == 3
    if name in ("bn", "brn"):
        mean, var = _expected(xs, (0, 2, 3))
    elif name == "ghost":
        stats = [_ghost_stats(x, 2) for x in xs]
        mean, var = torch.stack([m for m, _ in stats]).mean(0), torch.stack([v for _, v in stats]).mean(0)
    elif name == "bgn":  # D = C*H*W = 12 cut into 2 contiguous groups of 6
        mean, var = _expected([x.reshape(4, 2, 6).transpose(0, 1).reshape(2, -1).T for x in xs], (0,))
    if name == "gbgn":  # raw first and second moments per channel
        torch.testing.assert_close(layer.moving_x, torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0))
        torch.testing.assert_close(layer.moving_x2, torch.stack([(x**2).mean(dim=(0, 2, 3)) for x in xs]).mean(0))
    else:
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
    assert int(layer.num_batches_tracked) == 3
    assert layer.momentum == momentum and model.training
    for k, v in others.items():  # weights and e.g. brn's renorm_step untouched
        assert torch.equal(layer.state_dict()[k], v), k


def test_train_end_recalibration_is_in_the_last_checkpoint(tmp_path):
    """The recalibrated statistics are computed before the final validation and checkpoint, so
    ``last.ckpt`` holds them (not the moving averages of training)."""
    batches = _batches(4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    checkpoint = Checkpoint(dirpath=tmp_path, save_last=True, save_top_k=0)  # the CLI's: last.ckpt every epoch
    task = _Task()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[Recalibration(num_batches=3, when="train_end"), checkpoint],
    )
    trainer.fit(task, loader, loader)
    with torch.no_grad():
        fc_out = [task.net[1](task.net[0](b[0])) for b in batches[:3]]
    mean, var = _expected(fc_out, (0,))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["net.2.running_mean"], mean)
    torch.testing.assert_close(saved["net.2.running_var"], var)


def test_final_validation_of_the_fit_sees_the_recalibrated_statistics(tmp_path):
    """``train_end`` runs right after the last training step, before the last epoch's validation: the
    statistics that validation uses are the hand-computed cumulative average, not the moving average."""
    batches = _batches(4)
    loader = DataLoader(
        TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=4,
        shuffle=False,
    )

    class RecordingTask(_Task):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def validation_step(self, batch, batch_idx):
            bn = self.net[2]
            self.seen.append((self.current_epoch, bn.running_mean.clone(), bn.running_var.clone()))

    task = RecordingTask()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=[Recalibration(num_batches=3)],
    )
    trainer.fit(task, loader, loader)
    with torch.no_grad():
        fc_out = [task.net[1](task.net[0](b[0])) for b in batches[:3]]
    mean, var = _expected(fc_out, (0,))
    assert [epoch for epoch, _, _ in task.seen] == [0, 1]
    _, seen_mean, seen_var = task.seen[-1]
    torch.testing.assert_close(seen_mean, mean)
    torch.testing.assert_close(seen_var, var)
    assert not torch.allclose(task.seen[0][1], mean)  # the first epoch's validation: moving averages


def test_early_stopped_run_is_recalibrated_and_last_checkpoint_rewritten(run_dir, lightning_info):
    tmp_path = run_dir  # the working directory too: nothing else may be written there
    batches = _batches(4)
    loader = DataLoader(
        TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=4,
        shuffle=False,
    )

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    class CheckpointWithoutLastPath(LightningCheckpoint):  # a checkpoint callback with no last.ckpt: nothing to rewrite
        pass

    checkpoint = Checkpoint(dirpath=tmp_path, save_last=True, save_top_k=0)  # the CLI's: last.ckpt every epoch
    task = _Task()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[
            Recalibration(num_batches=2, when="train_end"),
            StopAfterFirstEpoch(),
            checkpoint,
            CheckpointWithoutLastPath(),
        ],
    )
    trainer.fit(task, loader, loader)
    assert trainer.current_epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert f"Recalibration: rewrote {tmp_path / 'last.ckpt'} with the recalibrated statistics" in lightning_info
    with torch.no_grad():
        fc_out = [task.net[1](task.net[0](b[0])) for b in batches[:2]]
    mean, var = _expected(fc_out, (0,))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["net.2.running_mean"], mean)
    torch.testing.assert_close(saved["net.2.running_var"], var)


def test_average_running_statistics_over_two_gloo_processes(tmp_path):
    """Each process holds its own statistics; afterwards both hold the average, counters untouched."""
    import torch.multiprocessing as mp
    from ddp_workers import average_worker

    mp.spawn(average_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for r in results:
        torch.testing.assert_close(r["mean"], torch.tensor([0.5, 1.5, 2.5]))
        torch.testing.assert_close(r["var"], torch.tensor([2.0, 3.0, 4.0]))
    assert [int(r["count"]) for r in results] == [7, 8]


def test_brn_corrections_use_the_trained_statistics_during_the_pass():
    """Two BRN layers in a row, renormalization fully on (r_max 3, d_max 5): while the first
    layer's running statistics are rebuilt from (0, 1), its output, which the second layer
    averages, still uses r, d against its trained statistics (m0, v0), as in training."""
    from normlightning.norms import build_norm

    torch.manual_seed(0)
    schedule = {"r_max_start_step": 0, "r_max_end_step": 1, "d_max_start_step": 0, "d_max_end_step": 1}
    first, second = build_norm("brn", 3, **schedule), build_norm("brn", 3, **schedule)
    model = nn.Sequential(first, second).eval()
    m0, v0 = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.25, 4.0, 1.5])
    with torch.no_grad():
        first.running_mean.copy_(m0)
        first.running_var.copy_(v0)
        first.renorm_step.fill_(10)
        first.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        first.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    batches = [torch.randn(4, 3, 5, 5) * 3 + 1 for _ in range(3)]

    recalibrate_statistics(model, batches, forward_fn=lambda m, x: m(x))

    eps = first.eps
    outputs = []
    for x in batches:  # the first layer's training output, written out with r, d against (m0, v0)
        mu = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        r = (torch.sqrt(var + eps) / torch.sqrt(v0 + eps)).clamp(1 / 3, 3)
        d = ((mu - m0) / torch.sqrt(v0 + eps)).clamp(-5, 5)
        x_hat = (x - mu.view(1, 3, 1, 1)) / torch.sqrt(var + eps).view(1, 3, 1, 1) * r.view(1, 3, 1, 1) + d.view(
            1, 3, 1, 1
        )
        outputs.append(first.weight.detach().view(1, 3, 1, 1) * x_hat + first.bias.detach().view(1, 3, 1, 1))
    expected_mean = torch.stack([y.mean(dim=(0, 2, 3)) for y in outputs]).mean(0)
    expected_var = torch.stack([y.var(dim=(0, 2, 3), unbiased=True) for y in outputs]).mean(0)
    torch.testing.assert_close(second.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second.running_var, expected_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_mean, torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0))
    assert first.renorm_reference is None and int(first.renorm_step) == 10


# ------------------------------------------------- mutation-testing survivors (docs/mutation.md)
class _StepLogger(_Logger):
    """Records each ``log_metrics`` call with its step."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[dict, int | None]] = []

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        self.calls.append((dict(metrics), step))


def _loader(k: int = 4) -> DataLoader:
    batches = _batches(k)
    data = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return DataLoader(data, batch_size=4, shuffle=False)


def _trainer(tmp_path, callback, logger=False, **kwargs) -> Trainer:
    settings = dict(max_epochs=1, num_sanity_val_steps=0) | kwargs
    return Trainer(
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        **settings,
    )


def test_a_batch_statistic_layer_inside_another_is_left_to_its_parent():
    class Composite(nn.BatchNorm1d):  # a batch-statistic layer that holds another one
        def __init__(self):
            super().__init__(2)
            self.inner = nn.BatchNorm1d(2)

    model = nn.Sequential()
    model.add_module("a", Composite())
    model.add_module("ab", nn.BatchNorm1d(2))  # its name starts with "a" but it is not inside "a"
    model.add_module("b", nn.BatchNorm1d(2))
    assert list(batch_statistic_layers(model)) == ["a", "ab", "b"]


@pytest.mark.parametrize(
    ("max_steps", "global_step", "max_epochs", "current_epoch", "batch_idx", "final"),
    [
        (3, 3, None, 0, 0, True),  # max_steps reached
        (3, 2, None, 0, 0, False),
        (-1, 5, -1, 0, 3, False),  # no limit at all (max_epochs=-1): never final, not even an epoch's last batch
        (-1, 5, 2, 1, 3, True),  # last batch (4 per epoch) of the last epoch
        (-1, 5, 2, 1, 2, False),
        (-1, 5, 2, 0, 3, False),
    ],
)
def test_final_training_batch(max_steps, global_step, max_epochs, current_epoch, batch_idx, final):
    from types import SimpleNamespace

    from normlightning.callbacks.recalibration import _is_final_training_batch

    trainer = SimpleNamespace(
        max_steps=max_steps,
        global_step=global_step,
        max_epochs=max_epochs,
        current_epoch=current_epoch,
        num_training_batches=4,
    )
    assert _is_final_training_batch(trainer, batch_idx) is final


def test_callback_keeps_its_settings():
    default = Recalibration()
    assert (default.num_batches, default.when) == (None, ("train_end",))
    assert default.report_accuracy is False and default.sync is True
    assert default.forward_fn is None and default.last_result is None

    def forward_fn(model, batch):
        return model(batch[0])

    chosen = Recalibration(num_batches=1, when=["train_end", "test_start"], forward_fn=forward_fn, sync=False)
    assert (chosen.num_batches, chosen.when, chosen.sync) == (1, ("train_end", "test_start"), False)
    assert chosen.forward_fn is forward_fn


def test_train_end_recalibrates_once_logs_at_the_last_step_and_uses_forward_fn(tmp_path, lightning_info, recwarn):
    calls = []

    def forward_fn(model, batch):
        calls.append(len(batch[0]))
        return model(batch[0])

    logger = _StepLogger()
    callback = Recalibration(num_batches=3, forward_fn=forward_fn)
    _trainer(tmp_path, callback, logger, max_steps=2).fit(_Task(), _loader())
    assert logger.calls == [({"recalibration/num_batches": 3.0}, 2)]
    assert calls == [4, 4, 4]
    assert callback.last_result == {"recalibration/num_batches": 3.0}
    lines = [m for m in lightning_info if m.startswith("Recalibration:")]
    assert len(lines) == 1
    seconds = float(lines[0].removeprefix("Recalibration: 3 batches in ").removesuffix(" s"))
    assert 0.0 <= seconds < 60.0
    assert not [w for w in recwarn if "validation dataloader" in str(w.message)]


def test_validation_start_recalibrates_before_each_validation_but_not_the_sanity_check(tmp_path):
    logger = _StepLogger()
    trainer = _trainer(
        tmp_path, Recalibration(num_batches=2, when="validation_start"), logger, max_epochs=2, num_sanity_val_steps=1
    )
    trainer.fit(_Task(), _loader(), _loader())
    assert logger.calls == [({"recalibration/num_batches": 2.0}, 4), ({"recalibration/num_batches": 2.0}, 8)]


def test_report_accuracy_without_a_validation_loader_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"^Recalibration: report_accuracy=True but there is no validation dataloader"):
        _trainer(tmp_path, Recalibration(num_batches=1, report_accuracy=True)).fit(_Task(), _loader())


def test_recalibration_without_training_data_names_the_fix(tmp_path):
    trainer = _trainer(tmp_path, Recalibration(when="validation_start"))
    with pytest.raises(RuntimeError, match=r"^Recalibration: no training dataloader; use a DataModule"):
        trainer.validate(_Task(), _loader())


class _Unsized(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from _loader(3)


@pytest.mark.parametrize(("loader", "used"), [("sized", 100), ("unsized", 3)])
def test_default_count_is_100_batches_or_a_shorter_loader(tmp_path, loader, used):
    """101 batches: the default takes 100; a loader without a length is read to its end (3 batches)."""
    if loader == "sized":
        x, y = torch.randn(202, 3, 2, 2, generator=torch.Generator().manual_seed(0)), torch.zeros(202, dtype=torch.long)
        train = DataLoader(TensorDataset(x, y), batch_size=2)
    else:
        train = DataLoader(_Unsized(), batch_size=None)
    logger = _StepLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unsized loader: "asked for 100 batches, the loader had 3"
        _trainer(tmp_path, Recalibration(), logger, max_steps=1).fit(_Task(), train)
    assert logger.metrics["recalibration/num_batches"] == float(used)


def test_average_running_statistics_reduces_the_floating_statistics_only():
    """The reduction (here: x -> 2x + 1, any callable) replaces every floating running statistic of the outermost
    batch-statistic layers; counters and layers without running statistics are left alone."""
    from normlightning.callbacks.recalibration import average_running_statistics

    model = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(3), nn.BatchNorm1d(2, affine=False))
    model.train()
    model[0](torch.randn(4, 2) * 3 + 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert average_running_statistics(model, lambda t: 2 * t + 1) == 6
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, 2 * before[key] + 1)
        else:
            assert torch.equal(value, before[key]), key


def test_test_start_recalibrates_before_testing(tmp_path):
    class Testable(_Task):
        def test_step(self, batch, batch_idx):
            pass

    class Data(LightningDataModule):  # test() reads the training batches from the data module
        def train_dataloader(self):
            return _loader()

        def test_dataloader(self):
            return _loader()

    logger = _StepLogger()
    trainer = _trainer(tmp_path, Recalibration(num_batches=2, when="test_start"), logger, max_steps=1)
    task = Testable()
    trainer.fit(task, datamodule=Data())
    assert logger.calls == []
    trainer.test(task, datamodule=Data(), verbose=False)
    assert logger.calls == [({"recalibration/num_batches": 2.0}, 1)]


def test_report_accuracy_measures_through_the_custom_forward_fn(tmp_path):
    """The accuracy passes before and after use ``forward_fn`` too: here it returns logits that always pick
    class 1, so both accuracies are the fraction of labels equal to 1 (counted here from the labels), which
    the model's own logits do not give (for this seed: the model is drawn from the global generator)."""
    torch.manual_seed(1)
    loader = _loader()
    labels = torch.cat([y for _, y in loader])
    share_of_ones = float((labels == 1).float().mean())

    def always_class_one(model, batch):
        logits = model(batch[0])
        return torch.stack([torch.zeros(len(logits)), torch.ones(len(logits))], dim=1)

    task = _Task()
    callback = Recalibration(num_batches=2, report_accuracy=True, forward_fn=always_class_one)
    _trainer(tmp_path, callback, max_steps=1).fit(task, loader, loader)
    own = torch.cat([task(x).argmax(1) for x, _ in loader])
    assert float((own == labels).float().mean()) != share_of_ones  # the default forward would differ
    assert callback.last_result["recalibration/acc_before"] == pytest.approx(share_of_ones)
    assert callback.last_result["recalibration/acc_after"] == pytest.approx(share_of_ones)


def test_average_running_statistics_reduces_the_statistics_a_layer_lists():
    """gbgn keeps raw moments (``moving_x``, ``moving_x2``, listed in ``running_stat_names``) instead of
    ``running_mean``/``running_var``: those are the ones reduced."""
    from normlightning.callbacks.recalibration import average_running_statistics
    from normlightning.norms import build_norm

    layer = build_norm("gbgn", 4, channel_groups=2)
    layer.train()
    layer(torch.randn(4, 4, 3, 3) * 2 + 1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert {"moving_x", "moving_x2"} <= set(before)
    assert average_running_statistics(layer, lambda t: 2 * t + 1) == 2
    for key, value in layer.state_dict().items():
        expected = 2 * before[key] + 1 if key in ("moving_x", "moving_x2") else before[key]
        torch.testing.assert_close(value, expected, msg=key)


class _TwoProcessStrategy:
    """Stands in for a distributed strategy of ``world_size`` processes in one process: ``reduce`` records each
    call and returns the reduction of the tensor with what the other process holds (``others``, one tensor per
    call, in the order the statistics are visited). As in Lightning's collective sync, the operation is only a
    mean when asked for by name; without ``reduce_op`` it would be a sum."""

    def __init__(self, others: list[torch.Tensor]):
        self.others = list(others)
        self.calls: list[tuple[torch.Tensor, dict]] = []

    def reduce(self, tensor, *args, **kwargs):
        self.calls.append((tensor.clone(), dict(kwargs)))
        assert not args, "the reduction is asked for by keyword"
        op = kwargs.get("reduce_op")
        assert op in ("mean", "sum", None), op
        total = tensor + self.others[len(self.calls) - 1]
        return total / 2 if op == "mean" else total


def _stand_in_trainer(batches, strategy, world_size):
    from types import SimpleNamespace

    data = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return SimpleNamespace(
        sanity_checking=False,
        datamodule=None,
        train_dataloader=DataLoader(data, batch_size=len(batches[0][0]), shuffle=False),
        val_dataloaders=None,
        progress_bar_callback=None,
        is_global_zero=True,
        state=SimpleNamespace(fn="fit"),
        world_size=world_size,
        strategy=strategy,
        loggers=[],
        global_step=0,
    )


def _bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12))


def test_several_processes_average_the_recalibrated_statistics_with_a_mean_reduction():
    """With two processes (``world_size == 2``), each recalibrates on its own batches and the callback then replaces
    ``running_mean`` and ``running_var`` by their mean over the processes (``strategy.reduce(..., reduce_op="mean")``;
    ``num_batches_tracked`` is not reduced): the cumulative average over the 2 K batches of both processes, computed
    here from the batches. This process sees batches 0-2, the other (simulated in the strategy) batches 3-5."""
    batches = _batches(6)
    flat = [x.flatten(1) for x, _ in batches]
    other_mean, other_var = _expected(flat[3:], (0,))
    strategy = _TwoProcessStrategy([other_mean, other_var])  # visited in name order: running_mean, running_var
    model = _bn_model()
    result = Recalibration(num_batches=3).recalibrate(_stand_in_trainer(batches[:3], strategy, 2), model)
    assert result == {"recalibration/num_batches": 3.0}
    own_mean, own_var = _expected(flat[:3], (0,))
    assert [kwargs for _, kwargs in strategy.calls] == [{"reduce_op": "mean"}, {"reduce_op": "mean"}]
    torch.testing.assert_close(strategy.calls[0][0], own_mean)
    torch.testing.assert_close(strategy.calls[1][0], own_var)
    mean, var = _expected(flat, (0,))
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize(("world_size", "sync"), [(1, True), (2, False)])
def test_one_process_or_sync_off_reduces_nothing(world_size, sync):
    """One process (nothing to average; no collective call), or ``sync=False``: every process keeps its own
    recalibration, the cumulative average over its own batches."""
    batches = _batches(3)
    strategy = _TwoProcessStrategy([])
    model = _bn_model()
    Recalibration(num_batches=3, sync=sync).recalibrate(_stand_in_trainer(batches, strategy, world_size), model)
    assert strategy.calls == []
    mean, var = _expected([x.flatten(1) for x, _ in batches], (0,))
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)


class _RecordedBar:
    """Records the settings of every bar the recalibration draws (``normlightning.evaluation.progress``'s ``Tqdm``)
    and how far each shown one got; the bars write into a buffer instead of the terminal."""

    def __init__(self, monkeypatch):
        import io

        from normlightning.evaluation import progress

        self.bars: list[dict] = []
        record = self.bars
        original = progress.Tqdm

        class Bar(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **(kwargs | {"file": io.StringIO()}))
                self.settings = {k: kwargs[k] for k in ("desc", "total", "disable", "position", "leave")}
                record.append(self.settings)

            def close(self):
                if not self.disable:
                    self.settings["steps"] = self.n
                super().close()

        monkeypatch.setattr(progress, "Tqdm", Bar)


class _BarData(LightningDataModule):
    def train_dataloader(self):
        return _loader(4)

    def val_dataloader(self):
        return _loader(2)

    def test_dataloader(self):
        return _loader(2)


class _Testable(_Task):
    def test_step(self, batch, batch_idx):
        pass


def _bar(desc, total, shown, below):
    settings = {"desc": desc, "total": total, "disable": not shown, "position": int(below), "leave": not below}
    return settings | ({"steps": total} if shown else {})


@pytest.mark.parametrize("shown", [True, False])
def test_progress_bars_follow_the_run(tmp_path, monkeypatch, shown):
    """When the run shows Lightning's progress bar, each pass draws one: ``Recalibration: val acc before``, then
    ``Recalibration`` over the K batches used, then ``Recalibration: val acc after``, each over its loader's length
    and advanced once per batch; during ``fit`` on the line below the training bar and removed when done, during
    ``test`` on the first line and left on screen. Without Lightning's bar, every one is disabled."""
    recorded = _RecordedBar(monkeypatch)
    callback = Recalibration(num_batches=3, when=["train_end", "test_start"], report_accuracy=True)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=shown,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        max_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    task = _Testable()
    trainer.fit(task, datamodule=_BarData())
    passes = [("Recalibration: val acc before", 2), ("Recalibration", 3), ("Recalibration: val acc after", 2)]
    assert recorded.bars == [_bar(desc, total, shown, below=True) for desc, total in passes]
    recorded.bars.clear()
    trainer.test(task, datamodule=_BarData(), verbose=False)
    assert recorded.bars == [_bar(desc, total, shown, below=False) for desc, total in passes]


def test_report_accuracy_reads_the_data_modules_validation_loader_outside_fit(tmp_path):
    """``trainer.test`` on a fresh trainer has loaded no validation loader; with ``report_accuracy`` the callback
    takes the data module's ``val_dataloader()``: here every validation label is 1 and ``forward_fn`` always picks
    class 1, so both accuracies are 1.0 (the training labels are mixed)."""

    def always_class_one(model, batch):
        logits = model(batch[0])
        return torch.stack([torch.zeros(len(logits)), torch.ones(len(logits))], dim=1)

    class Data(LightningDataModule):
        def train_dataloader(self):
            return _loader()

        def val_dataloader(self):
            x = torch.cat([x for x, _ in _loader(2)])
            return DataLoader(TensorDataset(x, torch.ones(len(x), dtype=torch.long)), batch_size=4)

        def test_dataloader(self):
            return _loader(1)

    callback = Recalibration(num_batches=2, when="test_start", report_accuracy=True, forward_fn=always_class_one)
    trainer = _trainer(tmp_path, callback)
    assert trainer.val_dataloaders is None
    trainer.test(_Testable(), datamodule=Data(), verbose=False)
    assert callback.last_result == {
        "recalibration/acc_before": 1.0,
        "recalibration/num_batches": 2.0,
        "recalibration/acc_after": 1.0,
    }


class _MeanOnlyBatchNorm(nn.Module):
    """A batch-statistic layer outside normlightning (mean-only batch normalization): it keeps ``running_mean`` but
    no ``running_var`` and lists no ``running_stat_names``, and counts its batches in a floating buffer."""

    uses_batch_statistics = True

    def __init__(self, channels: int):
        super().__init__()
        self.momentum = 0.1
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0.0))

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.num_batches_tracked.zero_()

    def forward(self, x):
        if self.training:
            self.num_batches_tracked += 1
            weight = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.lerp_(x.mean(0), weight)
            return x - x.mean(0)
        return x - self.running_mean


def test_average_running_statistics_skips_missing_statistics_and_the_counter():
    """A layer with the default statistic names (``running_mean``, ``running_var``) but only ``running_mean``: that
    one is reduced, the missing one is skipped, and the batch counter is left as it is even though it is a floating
    buffer."""
    from normlightning.callbacks.recalibration import average_running_statistics

    layer = _MeanOnlyBatchNorm(3)
    layer(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) + 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert average_running_statistics(layer, lambda t: 2 * t + 1) == 1
    torch.testing.assert_close(layer.running_mean, 2 * before["running_mean"] + 1)
    assert float(layer.num_batches_tracked) == 1.0
