"""BaseTask: the optimizer and learning-rate scheduler handling shared by every task.

The optimizer and scheduler are task arguments (``OptimizerCallable``,
``LRSchedulerCallable``), so a config reads::

    model:
      class_path: normlightning.tasks.ClassificationTask
      init_args:
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.CosineAnnealingLR
          init_args: {T_max: 200}

They are built in :meth:`BaseTask.configure_optimizers` from :meth:`BaseTask.parameter_groups`,
which runs after callbacks' ``setup`` (e.g. a norm injection that replaced layers), so the
optimizer always sees the model's final parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """The default optimizer: ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


class BaseTask(LightningModule):
    """A LightningModule whose optimizer and LR scheduler come from its arguments.

    Subclasses take keyword-only typed arguments, pass ``optimizer``, ``lr_scheduler``,
    ``lr_scheduler_interval`` and ``lr_scheduler_monitor`` on to ``super().__init__`` and
    call ``self.save_hyperparameters()`` (hyperparameters are then saved in checkpoints and
    ``SubTask.load_from_checkpoint(path)`` rebuilds the task).

    Args:
        optimizer: a callable ``params -> Optimizer`` (in a config: ``class_path`` of an
            optimizer and its ``init_args`` minus ``params``). Default:
            :func:`default_optimizer`, ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``.
        lr_scheduler: a callable ``optimizer -> LRScheduler`` or ``None`` (constant LR).
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        lr_scheduler_monitor: metric that a ``ReduceLROnPlateau`` scheduler watches.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> Optimizer, got {optimizer!r}")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"lr_scheduler must be a callable optimizer -> LRScheduler or None, got {lr_scheduler!r}")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor

    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """``LightningModule.save_hyperparameters`` that keeps checkpoints loadable.

        Launched from the CLI, the optimizer and scheduler arrive as config dicts
        (``class_path``/``init_args``) or import paths and are kept. Python callables (a ``partial``, a
        lambda) are dropped from the saved hyperparameters: they may not pickle, and a
        reloaded task then gets the default optimizer (inference does not need one).
        """
        frame = kwargs.pop("frame", None)
        if frame is None:
            import inspect

            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(*args, frame=frame, **kwargs)
        drop = [
            key
            for key in ("optimizer", "lr_scheduler")
            if self._hparams.get(key) is not None and not isinstance(self._hparams[key], (dict, str))
        ]
        if drop:
            self.remove_ignored_hparams(drop)
            for key in drop:
                self._hparams_initial.pop(key, None)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups handed to the optimizer (one group of all trainable parameters).

        Override (or extend) to give groups their own settings, e.g. no weight decay for
        normalization affine parameters. Called from :meth:`configure_optimizers`, i.e.
        after every callback's ``setup``.
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        """Build the optimizer from :meth:`parameter_groups` and the optional LR scheduler."""
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
