"""A last training batch that batch-statistic layers cannot normalize fails at setup, naming data.drop_last."""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback, Trainer

from normlightning.callbacks.norm_injection import NormInjection
from normlightning.data import Synthetic
from normlightning.tasks import ClassificationTask
from normlightning.training.last_batch import last_batch_size


def _fit(num_train: int, batch_size: int, drop_last: bool = False, callbacks=(), backbone="small_cnn"):
    data = Synthetic(
        input_shape=(3, 6, 6),
        num_classes=3,
        num_train=num_train,
        num_val=4,
        num_test=4,
        batch_size=batch_size,
        drop_last=drop_last,
    )
    kwargs = {"width": 4} if backbone == "small_cnn" else {"depth": 2, "width": 8}
    task = ClassificationTask(backbone=backbone, backbone_kwargs=kwargs, num_classes=3, input_shape=(3, 6, 6))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(task, datamodule=data)
    return trainer


def test_last_batch_size_per_process():
    assert last_batch_size(1079, 154) == 1
    assert last_batch_size(1078, 154) == 0
    assert last_batch_size(33, 8, world_size=2) == 1  # 17 examples per process
    assert last_batch_size(32, 8, world_size=2) == 0


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def test_a_last_batch_of_one_example_fails_at_setup_and_names_drop_last():
    """An MLP's BatchNorm1d has one value per example: a batch of one cannot be normalized."""
    counter = StepCounter()
    with pytest.raises(
        ValueError,
        match=r"last training batch of every epoch holds 1 example\(s\) \(17 training examples, batch_size 8\)"
        r".*data\.drop_last: true",
    ):
        _fit(17, 8, callbacks=[counter], backbone="mlp")
    assert counter.steps == 0  # failed before the first step, not after an epoch


def test_drop_last_or_a_valid_remainder_trains():
    assert _fit(17, 8, drop_last=True, backbone="mlp").global_step == 2
    assert _fit(18, 8, backbone="mlp").global_step == 3  # a last batch of 2 is fine for BN
    assert _fit(17, 8).global_step == 3  # conv BN normalizes one example over its 6x6 positions


def test_a_ghost_remainder_smaller_than_its_ghost_batches_fails_at_setup():
    with pytest.raises(ValueError, match=r"holds 3 example\(s\).*num_groups \(G_M\)=4.*data\.drop_last"):
        _fit(19, 8, callbacks=[NormInjection(method="ghost", num_groups=4)])
