"""A piecewise-constant learning-rate schedule with arbitrary factors per stage.

``MultiStepLR`` multiplies by one ``gamma`` at every milestone; schedules such as Gidaris &
Komodakis' (0.1, then 0.006, 0.0012, 0.00024 at epochs 20, 40, 50) need a factor per stage::

    lr(epoch) = base_lr * factors[i]   with i = number of milestones <= epoch,  factors[-1] := 1

In a config::

    lr_scheduler:
      class_path: normlightning.training.piecewise_lr.PiecewiseConstantLR
      init_args: {milestones: [20, 40, 50], factors: [0.06, 0.012, 0.0024]}

(``factors[j]`` applies from ``milestones[j]`` on; before the first milestone the factor is 1.)
The factors multiply each parameter group's initial LR, so linear LR scaling still applies.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PiecewiseConstantLR"]


class PiecewiseConstantLR(LRScheduler):
    """``lr = initial_lr * factor(epoch)``, a step function (see the module docstring).

    Args:
        optimizer: the wrapped optimizer.
        milestones: strictly increasing epochs (or steps, with ``lr_scheduler_interval: step``)
            at which a new factor starts.
        factors: one factor per milestone (``> 0``), relative to the initial LR.
        last_epoch: index of the last epoch (``-1``: start).
    """

    def __init__(
        self, optimizer: Optimizer, milestones: Sequence[int], factors: Sequence[float], last_epoch: int = -1
    ) -> None:
        milestones, factors = [int(m) for m in milestones], [float(f) for f in factors]
        if len(milestones) != len(factors):
            raise ValueError(
                f"PiecewiseConstantLR: one factor per milestone, got {len(milestones)} milestones and "
                f"{len(factors)} factors"
            )
        if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 0 for m in milestones):
            raise ValueError(f"PiecewiseConstantLR: milestones must be non-negative and increasing, got {milestones}")
        if any(f <= 0 for f in factors):
            raise ValueError(f"PiecewiseConstantLR: factors must be > 0, got {factors}")
        self.milestones, self.factors = milestones, factors
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """The factor in force at ``epoch``."""
        stage = bisect.bisect_right(self.milestones, epoch)
        return 1.0 if stage == 0 else self.factors[stage - 1]

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
