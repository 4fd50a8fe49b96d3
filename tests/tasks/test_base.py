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


# Mutation-testing survivors (docs/mutation.md): yaml_safe's conversions, argument checks that name the setting,
# the compile options, the hyperparameters dropped, and the data module that linear LR scaling needs.


def test_yaml_safe_keeps_plain_types_and_converts_the_rest() -> None:
    import enum
    from pathlib import PurePosixPath

    import yaml

    from normlightning.tasks.base import yaml_safe

    class Mode(enum.Enum):
        PAIR = (1, 2)

    value = {1: (None, True, 2, 3.5, "s"), "path": PurePosixPath("/a/b"), "mode": Mode.PAIR, "set": {3}, "obj": 1j}
    expected = {"1": [None, True, 2, 3.5, "s"], "path": "/a/b", "mode": [1, 2], "set": [3], "obj": "1j"}
    assert yaml_safe(value) == expected
    assert yaml.safe_load(yaml.safe_dump(yaml_safe(value))) == expected


def test_defaults_and_compile_options() -> None:
    task = BaseTask()
    assert (task.lr_scheduler_monitor, task.lr_scheduler_interval, task.compile_options) == ("val/loss", "epoch", None)
    assert BaseTask(compile=True).compile_options == {}
    options = {"backend": "eager"}
    compiled = BaseTask(compile=options)
    assert compiled.compile_options == options and compiled.compile_options is not options
    assert BaseTask(lr_base_batch_size=1).lr_base_batch_size == 1


def test_configure_model_compiles_the_forward_once_when_asked(monkeypatch) -> None:
    """``nn.Module.compile`` is recorded, not run (tests/tasks/test_compile.py compiles for real)."""
    calls = []
    for task in (BaseTask(), BaseTask(compile={"backend": "eager"})):
        monkeypatch.setattr(task, "compile", lambda **options: calls.append(options))
        task.configure_model()
    assert calls == [{"backend": "eager"}]
    task._compiled_call_impl = object()  # already compiled: the Trainer's next configure_model call does nothing
    task.configure_model()
    assert calls == [{"backend": "eager"}]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr_scheduler": "step"}, TypeError, r"^lr_scheduler must be a callable optimizer -> LRScheduler or None"),
        ({"lr_base_batch_size": 0}, ValueError, r"^lr_base_batch_size must be a positive int or None, got 0"),
        ({"lr_base_batch_size": True}, ValueError, r"^lr_base_batch_size must be a positive int or None, got True"),
        ({"lr_base_batch_size": 2.5}, ValueError, r"^lr_base_batch_size must be a positive int or None, got 2.5"),
        ({"compile": "yes"}, TypeError, r"^compile must be true, false or a dict of torch.compile arguments"),
    ],
)
def test_bad_arguments_name_the_setting(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        BaseTask(**kwargs)


def test_callable_scheduler_and_unsaved_arguments_are_not_saved() -> None:
    class Unsaved(TinyTask):
        unsaved_hparams = ("hidden",)

    task = Unsaved(hidden=4, lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2))
    # the callable scheduler and the unsaved argument are dropped; BaseTask's own settings are saved too
    assert dict(task.hparams) == {
        "lr_scheduler_interval": "epoch",
        "lr_scheduler_monitor": "val/loss",
        "compile": False,
        "gamma_weight_decay": None,
        "beta_weight_decay": None,
        "gamma_decay_target": 0,
        "lr_base_batch_size": None,
    }
    assert dict(task.hparams_initial) == dict(task.hparams)


def test_linear_lr_scaling_without_a_data_module_batch_size_names_it() -> None:
    from types import SimpleNamespace

    task = TinyTask()
    task.lr_base_batch_size = 256
    task._trainer = SimpleNamespace(datamodule=object(), world_size=1)  # what configure_optimizers reads
    with pytest.raises(ValueError, match=r"^lr_base_batch_size needs a data module with a `batch_size` attribute"):
        task.configure_optimizers()
