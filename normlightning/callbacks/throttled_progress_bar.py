"""The ``normlightning`` command's progress bar: Lightning's tqdm bar, redrawn at most every
``min_interval`` seconds.

Lightning's ``TQDMProgressBar`` redraws after every batch and reads the logged values for the
bar (a device synchronization per value on a GPU). With small batches that costs about as much
as the step itself; a terminal shows no more than a few redraws a second anyway.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from typing_extensions import override

__all__ = ["ThrottledProgressBar", "with_progress_bar"]


class ThrottledProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` that redraws after a batch only when ``min_interval`` seconds have
    passed since its last redraw, and always at the last batch of a loop.

    Args:
        min_interval: least time between two redraws, in seconds (0: Lightning's behaviour).
        refresh_rate, process_position, leave: as ``TQDMProgressBar`` (``refresh_rate`` batches
            between redraws at most).
    """

    def __init__(
        self, min_interval: float = 0.1, refresh_rate: int = 1, process_position: int = 0, leave: bool = False
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if min_interval < 0:
            raise ValueError(f"ThrottledProgressBar: min_interval must be >= 0 seconds, got {min_interval}")
        self.min_interval = float(min_interval)
        self._last_redraw = float("-inf")

    def _redraw_now(self, current: int, total: float | None) -> bool:
        """Whether batch ``current`` of ``total`` redraws its bar: Lightning's rule (every ``refresh_rate``
        batches and at the last one), and no sooner than ``min_interval`` seconds after the last redraw."""
        if not (self.is_enabled and (current % self.refresh_rate == 0 or current == total)):
            return False
        now = time.monotonic()
        if current == total or now - self._last_redraw >= self.min_interval:
            self._last_redraw = now
            return True
        return False

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._redraw_now(batch_idx + 1, self.train_progress_bar.total):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._redraw_now(batch_idx + 1, self.val_progress_bar.total):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._redraw_now(batch_idx + 1, self.test_progress_bar.total):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._redraw_now(batch_idx + 1, self.predict_progress_bar.total):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)


def with_progress_bar(callbacks: list[Callback] | None, enabled: bool) -> list[Callback]:
    """``callbacks`` plus a :class:`ThrottledProgressBar` when the bar is ``enabled`` and none of
    ``callbacks`` is a progress bar (a bar in the list while ``enable_progress_bar=False`` would
    make the Trainer raise)."""
    callbacks = list(callbacks or [])
    if enabled and not any(isinstance(callback, ProgressBar) for callback in callbacks):
        callbacks.append(ThrottledProgressBar())
    return callbacks
