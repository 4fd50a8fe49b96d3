"""ClassificationTask: forward, loss, metrics, predictions, checkpoint reload."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from normlightning.data import Synthetic
from normlightning.tasks import ClassificationTask


def _task(**kwargs) -> ClassificationTask:
    defaults = dict(
        backbone="small_cnn",
        num_classes=5,
        input_shape=(2, 6, 6),
        backbone_kwargs={"width": 4},
        input_mean=(0.5, 0.4),
        input_std=(0.2, 0.3),
    )
    return ClassificationTask(**{**defaults, **kwargs})


def test_forward_is_backbone_of_normalized_input() -> None:
    task = _task().eval()
    x = torch.rand(3, 2, 6, 6)
    by_hand = (x - torch.tensor([0.5, 0.4]).view(1, 2, 1, 1)) / torch.tensor([0.2, 0.3]).view(1, 2, 1, 1)
    assert torch.allclose(task(x), task.backbone(by_hand))
    assert next(iter(task.children())) is task.normalize  # the model's first module
    assert task.example_input_array.shape == (2, 2, 6, 6)
    probs = task.predict_step((x, torch.zeros(3, dtype=torch.long)), 0)
    assert torch.allclose(probs, task(x).softmax(-1)) and torch.allclose(probs.sum(-1), torch.ones(3))


def test_loss_matches_cross_entropy_with_label_smoothing() -> None:
    task = _task(label_smoothing=0.1).eval()
    x, y = torch.rand(4, 2, 6, 6), torch.tensor([0, 1, 4, 2])
    logits = task(x)
    log_probs = logits.log_softmax(-1)
    by_hand = -(0.9 * log_probs.gather(1, y[:, None]).squeeze(1) + 0.1 * log_probs.mean(-1)).mean()
    assert torch.allclose(task.training_step((x, y), 0), by_hand, atol=1e-6)
    assert torch.allclose(by_hand, F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)


def test_metric_names_depend_on_num_classes() -> None:
    assert set(_task(num_classes=5).val_metrics.keys()) == {"val/acc1", "val/acc5"}
    assert set(_task(num_classes=3).test_metrics.keys()) == {"test/acc1"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        _task(label_smoothing=1.0)
    with pytest.raises(ValueError, match="one value per channel"):
        _task(input_mean=(0.5,))


def test_logged_metrics_and_reload(tmp_path) -> None:
    data = Synthetic(input_shape=(2, 6, 6), num_classes=5, num_train=32, num_val=16, num_test=16, batch_size=8)
    task = _task(optimizer=partial(torch.optim.SGD, lr=0.05))
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/acc1", "train/acc5", "val/loss", "val/acc1", "val/acc5"} <= logged
    # val/acc1 is the plain accuracy of the model's argmax over the whole val split
    task.eval()
    xs, ys = map(torch.stack, zip(*[data.datasets["val"][i] for i in range(16)]))
    with torch.no_grad():
        accuracy = (task(xs).argmax(-1) == ys).float().mean()
    assert float(trainer.callback_metrics["val/acc1"]) == pytest.approx(float(accuracy))
    results = trainer.test(task, datamodule=data, verbose=False)[0]
    assert {"test/loss", "test/acc1", "test/acc5"} <= set(results)

    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassificationTask.load_from_checkpoint(path).eval()
    assert reloaded.hparams["backbone_kwargs"] == {"width": 4} and "optimizer" not in reloaded.hparams
    with torch.no_grad():
        assert torch.equal(reloaded(xs), task(xs))


class PenaltyTask(ClassificationTask):
    """Overrides only the loss hook: cross-entropy plus a logit penalty and a constant offset."""

    def training_loss(self, logits, batch):
        return F.cross_entropy(logits, batch[1]) + 0.5 * logits.pow(2).mean() + 100.0


def test_training_loss_hook_keeps_metrics_and_logging(tmp_path) -> None:
    task = PenaltyTask(
        backbone="small_cnn",
        num_classes=5,
        input_shape=(2, 6, 6),
        backbone_kwargs={"width": 4},
        optimizer=partial(torch.optim.SGD, lr=0.05),
    ).eval()
    x, y = torch.rand(6, 2, 6, 6), torch.tensor([0, 1, 4, 2, 3, 3])
    logits = task(x)
    by_hand = F.cross_entropy(logits, y) + 0.5 * logits.pow(2).mean() + 100.0
    assert torch.allclose(task.training_step((x, y), 0), by_hand, atol=1e-5)
    # the training step still fed the training accuracy with the step's logits
    accuracy = (logits.argmax(-1) == y).float().mean()
    assert float(task.train_metrics.compute()["train/acc1"]) == pytest.approx(float(accuracy))
    task.train_metrics.reset()

    data = Synthetic(input_shape=(2, 6, 6), num_classes=5, num_train=32, num_val=16, num_test=16, batch_size=8)
    before = [p.detach().clone() for p in task.parameters()]
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task.train(), datamodule=data)
    logged = trainer.callback_metrics
    assert {"train/loss", "train/acc1", "train/acc5", "val/loss", "val/acc1"} <= set(logged)
    assert 100.0 < float(logged["train/loss"]) < 110.0  # the overridden loss was logged (and minimized)
    assert float(logged["val/loss"]) < 100.0  # validation keeps the plain cross-entropy
    assert 0.0 <= float(logged["train/acc1"]) <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters()))  # it trained


class RecordingTask(ClassificationTask):
    """Records every ``train/loss`` value handed to ``self.log`` with the step it was logged at,
    and the loss of every training step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loss_logs, self.step_losses, self.step_hits = [], [], []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(float(loss.detach()))
        logits = self(batch[0])
        self.step_hits.append((logits.argmax(-1) == batch[1]).sum().item())
        return loss

    def log(self, name, value, *args, **kwargs):
        if name == "train/loss":
            self.loss_logs.append((self.global_step, float(value)))
        super().log(name, value, *args, **kwargs)


def test_train_loss_logged_at_logging_steps_and_epoch_end_accuracy(tmp_path) -> None:
    """``train/loss`` goes to Lightning at the steps its logger writes (every log_every_n_steps) and
    at the epoch's last batch; the training accuracy is the epoch's, logged once at its end."""
    data = Synthetic(input_shape=(2, 6, 6), num_classes=5, num_train=40, num_val=8, num_test=8, batch_size=8)
    task = RecordingTask(
        backbone="small_cnn",
        num_classes=5,
        input_shape=(2, 6, 6),
        backbone_kwargs={"width": 4},
        optimizer=partial(torch.optim.SGD, lr=0.0),
    )  # lr 0: the step's logits are the recomputed ones
    trainer = Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=2,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    assert [step for step, _ in task.loss_logs] == [1, 3, 4]  # steps 0..4: every 2nd, and the last batch
    assert [value for _, value in task.loss_logs] == pytest.approx([task.step_losses[i] for i in (1, 3, 4)])
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(task.step_losses[-1])
    assert float(trainer.callback_metrics["train/acc1"]) == pytest.approx(sum(task.step_hits) / 40)


def test_epoch_accuracy_is_visible_to_callbacks_at_the_epoch_end(tmp_path) -> None:
    """Callbacks that read ``val/acc1`` in their ``on_validation_epoch_end`` (MedianOfLastEpochs) see
    the epoch that just ended (the metric objects are logged once per epoch, at their first update)."""
    from lightning.pytorch import Callback

    from normlightning.callbacks.median_last_epochs import MedianOfLastEpochs

    class Probe(Callback):
        seen: list = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.seen.append(float(trainer.callback_metrics["val/acc1"]))

    data = Synthetic(input_shape=(2, 6, 6), num_classes=5, num_train=16, num_val=16, num_test=8, batch_size=8)
    task = _task(optimizer=partial(torch.optim.SGD, lr=0.5))
    probe, median = Probe(), MedianOfLastEpochs(k=1)
    trainer = Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[probe, median],
    )
    trainer.fit(task, datamodule=data)
    task.eval()
    xs, ys = map(torch.stack, zip(*[data.datasets["val"][i] for i in range(16)]))
    with torch.no_grad():
        accuracy = float((task(xs).argmax(-1) == ys).float().mean())
    assert (
        len(probe.seen) == 2
        and probe.seen[-1] == pytest.approx(accuracy)
        and median.history[-1] == pytest.approx(accuracy)
    )
