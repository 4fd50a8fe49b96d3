"""The checkpoint callback of the ``normlightning`` command (its ``checkpoint:`` section):
a ``ModelCheckpoint`` whose ``last.ckpt`` always holds the latest state, that never saves
non-finite weights, and its defaults."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from normlightning.callbacks.divergence import first_nonfinite_tensor

__all__ = ["CHECKPOINT_DEFAULTS", "Checkpoint"]

#: Defaults of the ``checkpoint:`` section of the CLI (a :class:`Checkpoint` that is always present).
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "monitor": "val/acc1",
    "mode": "max",
    "save_last": True,
    "save_top_k": 1,
    "filename": "best-epoch{epoch:03d}-step{step}",
    "auto_insert_metric_name": False,
}


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is refreshed at every checkpointing point.

    Lightning 2.6 writes ``last.ckpt`` (``save_last=True``) only when a top-k checkpoint is
    written, so with a monitored metric that stops improving ``last.ckpt`` would lag behind
    the run and resuming from it would repeat epochs. Here it always holds the latest state
    (after each validation, or each training epoch when checkpointing there).

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
    #: Epoch (``trainer.current_epoch``) at which ``best_model_path`` was saved; ``None``: no best yet.
    best_model_epoch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_model_epoch": self.best_model_epoch}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._stage = stage

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit") and state_dict.get("dirpath", self.dirpath) != self.dirpath:
            self.best_model_path = state_dict["best_model_path"]
            self.best_model_epoch = state_dict.get("best_model_epoch")
            return
        super().load_state_dict(state_dict)
        self.best_model_epoch = state_dict.get("best_model_epoch")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self._weights_are_finite(trainer):
            best_before = self.best_model_path
            super()._save_topk_checkpoint(trainer, monitor_candidates)
            if self.best_model_path and self.best_model_path != best_before:
                self.best_model_epoch = trainer.current_epoch

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self._weights_are_finite(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

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

    def _refresh_last(self, trainer: Trainer) -> None:
        # skipped in sanity checks, fast_dev_run, outside fit, and when this step is already saved
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
