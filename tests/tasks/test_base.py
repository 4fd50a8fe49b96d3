"""BaseTask: optimizer and LR scheduler built from the task's arguments and parameter_groups()."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from normlightning.tasks import BaseTask, default_optimizer


class TinyTask(BaseTask):
    def __init__(
        self,
        *,
        hidden: int = 3,
        optimizer=default_optimizer,
        lr_scheduler=None,
        lr_scheduler_interval="epoch",
        lr_scheduler_monitor="val/loss",
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            lr_scheduler_monitor=lr_scheduler_monitor,
        )
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


def test_default_optimizer_is_sgd_over_all_trainable_parameters() -> None:
    task = TinyTask()
    optimizer = task.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable and id(task.frozen) not in trainable


def test_scheduler_interval_and_plateau_monitor() -> None:
    task = TinyTask(
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2),
        lr_scheduler_interval="step",
    )
    config = task.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step" and "monitor" not in config["lr_scheduler"]
    plateau = TinyTask(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau, lr_scheduler_monitor="val/acc1")
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val/acc1"


def test_parameter_groups_is_the_override_point() -> None:
    class TwoGroups(TinyTask):
        def parameter_groups(self):
            norm = list(self.net[1].parameters())
            rest = [p for n, p in self.named_parameters() if not n.startswith("net.1.") and p.requires_grad]
            return [{"params": rest}, {"params": norm, "weight_decay": 0.0}]

    optimizer = TwoGroups().configure_optimizers()
    assert [len(g["params"]) for g in optimizer.param_groups] == [4, 2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_python_callables_are_not_saved_in_hyperparameters() -> None:
    task = TinyTask(hidden=4, optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    assert dict(task.hparams) == {
        "hidden": 4,
        "lr_scheduler": None,
        "lr_scheduler_interval": "epoch",
        "lr_scheduler_monitor": "val/loss",
        # BaseTask's own settings, at their defaults
        "gamma_weight_decay": None,
        "beta_weight_decay": None,
        "gamma_decay_target": 0,
        "lr_base_batch_size": None,
        "compile": False,
    }
    assert "optimizer" not in task.hparams_initial
    assert task.configure_optimizers().param_groups[0]["lr"] == 0.5


@dataclasses.dataclass(frozen=True)
class Setting:
    size: int = 3


class NoCallTask(BaseTask):
    """A task that never calls save_hyperparameters itself."""

    unsaved_hparams = ("scratch",)

    def __init__(self, *, width: int = 2, setting: Setting = Setting(), scratch: str = "x", **kwargs) -> None:
        super().__init__(**kwargs)


def test_base_task_saves_every_subclass_argument_in_one_place() -> None:
    """BaseTask.__init__ saves the subclass's arguments (no call of its own needed), leaves out its
    unsaved_hparams and saves a dataclass argument as a plain dict (what a weights-only load reads)."""
    task = NoCallTask(width=5, setting=Setting(size=7), lr_base_batch_size=256)
    assert task.hparams["width"] == 5 and task.hparams["lr_base_batch_size"] == 256
    assert task.hparams["setting"] == {"size": 7} and task.hparams_initial["setting"] == {"size": 7}
    assert "scratch" not in task.hparams and "scratch" not in task.hparams_initial


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        TinyTask(optimizer="sgd")
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        TinyTask(lr_scheduler_interval="batch")
