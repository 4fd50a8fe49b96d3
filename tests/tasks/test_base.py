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


# Mutation-testing survivors of the hooks (docs/mutation.md, issue 27): the last-batch check at setup, Lightning's
# save_hyperparameters arguments passed through the override, and the random states restored on resume only.


def test_setup_checks_the_last_batch_per_process_and_only_at_fit() -> None:
    """34 examples in batches of 8 over 2 processes: 17 per process, a last batch of 34 / 2 - 2 * 8 = 1 example,
    which an MLP's BatchNorm1d cannot normalize (on one process the last batch holds 34 - 4 * 8 = 2: fine)."""
    from types import SimpleNamespace

    from normlightning.data import Synthetic
    from normlightning.tasks import ClassificationTask

    data = Synthetic(input_shape=(3, 6, 6), num_classes=3, num_train=34, num_val=4, num_test=4, batch_size=8)
    data.setup("fit")
    task = ClassificationTask(
        backbone="mlp", backbone_kwargs={"depth": 2, "width": 8}, num_classes=3, input_shape=(3, 6, 6)
    )
    task.setup("fit")  # no trainer attached: nothing to check
    task._trainer = SimpleNamespace(datamodule=data, world_size=2)  # what setup reads
    for stage in ("validate", "test", "predict"):
        task.setup(stage)  # the training batches matter at fit only
    with pytest.raises(
        ValueError,
        match=r"holds 1 example\(s\) \(34 training examples per process \(2 processes\), batch_size 8\).*drop_last",
    ):
        task.setup("fit")
    task._trainer = SimpleNamespace(datamodule=data, world_size=1)
    task.setup("fit")


class SavesMore(BaseTask):
    """Calls Lightning's ``save_hyperparameters`` once more, with a dict of its own and ``logger``."""

    def __init__(self, *, log_hyperparameters: bool = True) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.save_hyperparameters({"schedule": "cosine"}, logger=log_hyperparameters)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()


class SavesFromAFrame(BaseTask):
    """Changes an argument after ``BaseTask.__init__`` saved it, then saves again from ``frame``."""

    def __init__(self, *, hidden: int = 3, frame=None) -> None:
        super().__init__()  # saves hidden as given
        hidden = 2 * hidden  # collected again only where the second call looks: this frame, not the test's
        self.save_hyperparameters(frame=frame)


def test_save_hyperparameters_passes_lightnings_arguments_on(tmp_path) -> None:
    """The override keeps ``LightningModule.save_hyperparameters``' arguments: a dict to save, ``logger`` (whether
    the Trainer's loggers receive the hyperparameters) and ``frame`` (the constructor arguments are collected from
    that frame up the stack: from a frame outside any constructor, nothing; not from the caller's)."""
    import inspect

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    class Recorder(Logger):
        name, version = "recorder", 0

        def __init__(self) -> None:
            super().__init__()
            self.received: list[dict] = []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            self.received.append(dict(params))

        def log_metrics(self, metrics, step=None) -> None:
            pass

    loader = DataLoader(TensorDataset(torch.rand(2, 2)), batch_size=2)
    received = {}
    for log_hyperparameters in (True, False):
        task, logger = SavesMore(log_hyperparameters=log_hyperparameters), Recorder()
        assert task.hparams["schedule"] == "cosine" and task.hparams["lr_scheduler_interval"] == "epoch"
        trainer = Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(task, loader)
        received[log_hyperparameters] = logger.received
    assert received[True] == [dict(SavesMore().hparams_initial)] and received[False] == []

    assert SavesFromAFrame(hidden=5).hparams["hidden"] == 10  # no frame: the caller's arguments as they are now
    assert SavesFromAFrame(hidden=5, frame=inspect.currentframe()).hparams["hidden"] == 5  # this test's: none


class RandomStateProbe(BaseTask):
    """Records torch's random state right after ``BaseTask.on_train_start``, which restores a resumed checkpoint's."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.state_at_train_start = torch.get_rng_state()


def test_random_states_are_restored_when_a_fit_resumes_and_only_then(tmp_path) -> None:
    """A fit resuming from a checkpoint starts from the random state saved in it; a later fit of the same task, or a
    fit of a task loaded with ``load_from_checkpoint``, starts where a fresh task's fit from the same seed starts."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.rand(4, 2)), batch_size=4)  # one step per epoch: checkpoints at its end

    def fit(task, steps, **kwargs):
        trainer = Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(task, loader, **kwargs)
        return trainer

    path = tmp_path / "one-step.ckpt"
    fit(RandomStateProbe(), 1).save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["rng_states"]["torch"]
    torch.manual_seed(1)
    assert not torch.equal(torch.get_rng_state(), saved)
    resumed = RandomStateProbe()
    fit(resumed, 2, ckpt_path=path)
    assert torch.equal(resumed.state_at_train_start, saved)

    fresh = RandomStateProbe()
    torch.manual_seed(2)
    fit(fresh, 1)
    assert not torch.equal(fresh.state_at_train_start, saved)
    torch.manual_seed(2)
    fit(resumed, 1)  # the same task again, without a checkpoint
    assert torch.equal(resumed.state_at_train_start, fresh.state_at_train_start)
    reloaded = RandomStateProbe.load_from_checkpoint(path)
    torch.manual_seed(2)
    fit(reloaded, 1)
    assert torch.equal(reloaded.state_at_train_start, fresh.state_at_train_start)
