"""What a finished ``normlightning`` command prints last: where its files went.

After ``fit`` (:func:`fit_summary`)::

    normlightning fit: done (230 optimizer steps; epochs count from 0)
      run folder:      runs/quickstart/version_0
      best checkpoint: runs/quickstart/version_0/checkpoints/best-epoch009-step230.ckpt (val/acc1=0.9972 at epoch 9)
      last checkpoint: runs/quickstart/version_0/checkpoints/last.ckpt

After ``validate`` / ``test`` (:func:`evaluation_summary`): the metrics of that stage and the folder
they were logged to. Paths are as the trainer holds them (relative to the working directory
unless configured absolute).
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["evaluation_summary", "fit_summary"]


def _run_folder(trainer: Trainer) -> str:
    if trainer.loggers:
        return trainer.log_dir or trainer.default_root_dir
    return f"none (no logger; default_root_dir {trainer.default_root_dir})"


def _best_checkpoint(callback: ModelCheckpoint) -> str:
    if not callback.best_model_path:
        if callback.save_top_k == 0 or callback.monitor is None:
            return "none (no monitored top-k checkpoint: checkpoint.save_top_k=0 or checkpoint.monitor=null)"
        return f"none ({callback.monitor} was never logged at a checkpointing point)"
    score = callback.best_model_score
    value = f"{callback.monitor}={float(score):.4g}" if score is not None else str(callback.monitor)
    epoch = getattr(callback, "best_model_epoch", None)
    return f"{callback.best_model_path} ({value}{f' at epoch {epoch}' if epoch is not None else ''})"


def fit_summary(trainer: Trainer) -> list[str]:
    """The lines printed at the end of ``fit``: the run folder, the best checkpoint with its metric value
    and epoch, and ``last.ckpt`` (of the trainer's first ``ModelCheckpoint``)."""
    lines = [
        f"normlightning fit: done ({trainer.global_step} optimizer steps; epochs count from 0)",
        f"  run folder:      {_run_folder(trainer)}",
    ]
    callback = trainer.checkpoint_callback
    if callback is None:
        return [*lines, "  checkpoints:     none (trainer.enable_checkpointing=false)"]
    if trainer.fast_dev_run:
        return [*lines, "  checkpoints:     none (trainer.fast_dev_run saves no checkpoint)"]
    return [
        *lines,
        f"  best checkpoint: {_best_checkpoint(callback)}",
        f"  last checkpoint: {callback.last_model_path or 'none (checkpoint.save_last=false)'}",
    ]


def evaluation_summary(trainer: Trainer, stage: str) -> list[str]:
    """The lines printed at the end of ``validate`` (``stage="val"``) or ``test``: every ``<stage>/`` metric
    and the folder it was logged to."""
    metrics = {
        key: float(value)
        for key, value in sorted(trainer.callback_metrics.items())
        if key.startswith(f"{stage}/") and value.numel() == 1
    }
    command = "validate" if stage == "val" else stage
    checkpoint = f" (weights: {trainer.ckpt_path})" if trainer.ckpt_path else " (weights: as built, no --ckpt_path)"
    listed = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items()) or "no metric logged"
    return [f"normlightning {command}: {listed}{checkpoint}", f"  logged to: {_run_folder(trainer)}"]
