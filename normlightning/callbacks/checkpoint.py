"""The checkpoint callback of the ``normlightning`` command (its ``checkpoint:`` section):
a ``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest state, that never saves
non-finite weights, and its defaults."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from normlightning.callbacks.divergence import first_nonfinite_tensor

__all__ = ["CHECKPOINT_DEFAULTS", "TASK_MONITOR", "Checkpoint", "resolve_monitor"]

#: The ``monitor`` that stands for the task's own :attr:`~normlightning.tasks.BaseTask.monitor`, read at setup.
TASK_MONITOR = "task"

#: Defaults of the ``checkpoint:`` section of the CLI (a :class:`Checkpoint` that is always present).
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "monitor": TASK_MONITOR,
    "mode": "max",
    "save_last": True,
    "save_top_k": 1,
    "filename": "best-epoch{epoch:03d}-step{step}",
    "auto_insert_metric_name": False,
}


def resolve_monitor(monitor: str | None, pl_module: LightningModule) -> str | None:
    """``monitor``, with :data:`TASK_MONITOR` replaced by ``pl_module``'s own ``monitor`` (``None`` without one)."""
    return getattr(pl_module, "monitor", None) if monitor == TASK_MONITOR else monitor


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that monitors the task's metric and whose ``last.ckpt`` is refreshed at every
    checkpointing point.

    With ``monitor="task"`` (:data:`TASK_MONITOR`, the CLI's default) it keeps the best checkpoint of the
    task's own ``monitor`` (:attr:`~normlightning.tasks.BaseTask.monitor`: ``val/acc1``, ``val/acc1_robust``
    for :class:`~normlightning.tasks.AdversarialTask`), read at ``setup``; ``monitor=None``, or a task
    without one, keeps the latest checkpoint as ``best``.

    Lightning 2.6 writes ``last.ckpt`` (``save_last=True``) only when a top-k checkpoint is
    written, so with a monitored metric that stops improving ``last.ckpt`` would lag behind
    the run and resuming from it would repeat epochs. Here it always holds the latest state: written
    at the end of each training epoch (after its validation, so a resumed fit starts the next epoch)
    and after each validation inside an epoch (``val_check_interval < 1``).
    Only ``ModelCheckpoint``'s public hooks and attributes are used.

    Outside ``fit`` (``validate``/``test``/``predict --ckpt_path``) the run logs into a new
    ``version_N`` folder, so the restored checkpoint's folder differs from this run's by design:
    only ``best_model_path`` is restored (what ``--ckpt_path best`` needs), without
    ``ModelCheckpoint``'s "dirpath has changed" warning. A resumed ``fit`` in a new folder still warns.

    Weights holding a NaN or an infinity (a diverged run trained on with
    ``divergence.on_nonfinite: warn`` or ``ignore``) are never saved, neither as a best checkpoint
    nor as ``last.ckpt``: both keep the last finite state, and a warning says so once.

    :attr:`best_model_epoch` is the epoch of ``best_model_path`` (kept in the callback's state, so a
    resumed run still knows it); the CLI prints it at the end of ``fit``.
    """

    _stage: str | None = None
    _warned_nonfinite: bool = False
    #: ``trainer.global_step`` at which this callback last wrote ``last.ckpt`` (0: not yet; no file at step 0).
    _last_written_step: int = 0
    #: Epoch (``trainer.current_epoch``) at which ``best_model_path`` was saved; ``None``: no best yet.
    best_model_epoch: int | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_model_epoch": self.best_model_epoch}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage
        self.monitor = resolve_monitor(self.monitor, pl_module)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit") and state_dict.get("dirpath", self.dirpath) != self.dirpath:
            self.best_model_path = state_dict["best_model_path"]
            self.best_model_epoch = state_dict.get("best_model_epoch")
            return
        super().load_state_dict(state_dict)
        self.best_model_epoch = state_dict.get("best_model_epoch")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # ModelCheckpoint saves here only with step or time triggers, which leave every_n_epochs at 0
        if self.every_n_epochs == 0 and not self._may_save(trainer):
            return
        self._save_as_lightning_does(trainer, super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._may_save(trainer):
            self._save_as_lightning_does(trainer, super().on_train_epoch_end, trainer, pl_module)
            self._write_last(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._may_save(trainer):
            self._save_as_lightning_does(trainer, super().on_validation_end, trainer, pl_module)
            if not trainer.is_last_batch:  # a validation inside the epoch; at its end, on_train_epoch_end writes
                self._write_last(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last is not True:
            super().on_train_end(trainer, pl_module)
        elif self._may_save(trainer):
            self._write_last(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Lightning's exception checkpoint (where allowed); after SIGTERM, say on stderr where the run
        stopped and how to resume it (the command then exits 143)."""
        if not self.save_on_exception or self._may_save(trainer):
            super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, SIGTERMException) and trainer.is_global_zero:
            fitting = trainer.state.fn == TrainerFn.FITTING
            print(
                f"normlightning: {trainer.state.fn.value if trainer.state.fn else 'run'} stopped by SIGTERM at "
                f"step {trainer.global_step} (epoch {trainer.current_epoch}); "
                + (self._resume_hint() if fitting else "rerun it"),
                file=sys.stderr,
                flush=True,
            )

    def _resume_hint(self) -> str:
        """Where the interrupted fit can resume from (this run's ``last.ckpt``, if written)."""
        if not self.last_model_path:
            return "no checkpoint was written yet: rerun it from the start"
        return f"resume with: fit --config <the same config> --ckpt_path {self.last_model_path}"

    def _may_save(self, trainer: Trainer) -> bool:
        """Whether a checkpoint may be written now: during ``fit``, outside the sanity check and
        ``fast_dev_run`` (Lightning's own conditions), and with finite weights on every process."""
        if trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return False
        return self._weights_are_finite(trainer)

    def _save_as_lightning_does(self, trainer: Trainer, hook: Callable[..., None], *args: Any) -> None:
        """Run ``ModelCheckpoint``'s ``hook`` for its top-k checkpoints (``last.ckpt`` is :meth:`_write_last`'s
        when ``save_last=True``) and note the epoch of a new best."""
        best_before, save_last = self.best_model_path, self.save_last
        if save_last is True:
            self.save_last = False
        try:
            hook(*args)
        finally:
            self.save_last = save_last
        if self.best_model_path and self.best_model_path != best_before:
            self.best_model_epoch = trainer.current_epoch

    def _write_last(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` (``save_last=True``) unless it already holds this step (or nothing was trained).

        ``ModelCheckpoint`` itself writes it only together with a new top-k checkpoint; here it
        follows the run. An existing ``last.ckpt`` that is not this run's gets a ``-v<n>`` name, as
        Lightning does.
        """
        if self.save_last is not True or trainer.global_step in (0, self._last_written_step):
            return
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        while self.file_exists(path, trainer) and path != self.last_model_path:
            path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        self.last_model_path = path  # before saving: it is part of the saved callback state
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_written_step = trainer.global_step

    def _weights_are_finite(self, trainer: Trainer) -> bool:
        """Whether every process's weights are finite; warns (once) when they are not."""
        name = first_nonfinite_tensor(trainer.lightning_module)
        if not trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            return True
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"checkpoint: the weights are not finite at step {trainer.global_step} "
                f"({name or 'on another process'}); "
                f"no checkpoint is saved from now on while they are not (best and last.ckpt keep the last finite state)"
            )
        return False
