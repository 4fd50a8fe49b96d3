"""The median of a validation metric over the last ``k`` epochs (Wu & He 2018; BGN paper §4.1).

The BGN paper reports "the median accuracy in the last five epochs ... to reduce the random
variance". :class:`MedianOfLastEpochs` records ``monitor`` (default ``val/acc1``) after every
validation epoch (sanity checks excluded) and logs ``<monitor>_median<k>``: the median of the
last ``k`` recorded values (of all of them while fewer than ``k`` exist). Its history lives in
the checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import statistics
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class MedianOfLastEpochs(Callback):
    """Log ``median(monitor over the last k validation epochs)`` as ``<monitor>_median<k>``.

    Args:
        monitor: logged metric to follow (must be logged at validation epoch end).
        k: number of most recent epochs in the median (``>= 1``).
    """

    def __init__(self, monitor: str = "val/acc1", k: int = 5) -> None:
        if k < 1:
            raise ValueError(f"MedianOfLastEpochs: k must be >= 1, got {k}")
        self.monitor = monitor
        self.k = k
        self.history: list[float] = []

    @property
    def name(self) -> str:
        return f"{self.monitor}_median{self.k}"

    def median(self) -> float:
        """Median of the last ``k`` recorded values."""
        if not self.history:
            raise ValueError(f"MedianOfLastEpochs: no value of {self.monitor!r} recorded yet")
        return float(statistics.median(self.history[-self.k :]))

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"MedianOfLastEpochs: metric {self.monitor!r} was not logged; logged metrics: "
                f"{sorted(trainer.callback_metrics)}. Set monitor to one of them."
            )
        self.history.append(float(value))
        pl_module.log(self.name, self.median(), sync_dist=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [float(v) for v in state_dict.get("history", [])]
