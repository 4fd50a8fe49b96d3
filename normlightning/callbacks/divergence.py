"""Stop a diverging run at the step where it diverges (the ``divergence:`` section of the CLI).

A run whose loss becomes NaN or infinite (e.g. a learning rate of ``1e6``) would otherwise train
on to the end, exit 0 and save non-finite weights. :class:`DivergenceCheck` looks at every
training step:

- the loss, before the backward pass (``on_before_backward``): a non-finite loss stops the run
  before the optimizer applies its gradients, so the weights stay those of the previous step;
- the weights (parameters and floating-point buffers, e.g. BatchNorm's running statistics) after
  the optimizer step (``on_train_batch_end``): finite loss but an infinite gradient also diverges.

``on_nonfinite`` says what happens then: ``error`` (default) raises :class:`NonFiniteError`,
naming the step, the epoch and the learning rate(s); ``warn`` warns once and trains on;
``ignore`` does not look (for studies of divergence). Whatever the setting, the ``checkpoint:``
callback never saves non-finite weights (:class:`~normlightning.callbacks.checkpoint.Checkpoint`).

Cost: one device-to-host sync per step for the loss and one for the weights (one
``isfinite().all()`` per tensor, reduced to a single flag).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["DivergenceCheck", "NonFiniteError", "first_nonfinite_tensor", "learning_rates"]


class NonFiniteError(RuntimeError):
    """The training loss or the weights became NaN or infinite."""


def first_nonfinite_tensor(module: nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer of ``module`` holding a NaN or an
    infinity (``None``: all finite). One flag per tensor, one sync for the whole module."""
    named = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if b.is_floating_point())]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0])][0]


def learning_rates(trainer: Trainer) -> str:
    """The current learning rate of every optimizer's parameter groups, e.g. ``"lr 1e+06"`` or
    ``"lr 0.1, 0.01"`` (groups with their own rates)."""
    rates = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
    distinct = list(dict.fromkeys(rates))
    return "lr " + ", ".join(f"{rate:g}" for rate in distinct) if distinct else "no optimizer"


class DivergenceCheck(Callback):
    """Detect a non-finite training loss or non-finite weights at the step they appear.

    Args:
        on_nonfinite: ``error`` (stop with :class:`NonFiniteError`, the run exits non-zero),
            ``warn`` (warn once, train on) or ``ignore`` (no check).
    """

    def __init__(self, on_nonfinite: Literal["error", "warn", "ignore"] = "error") -> None:
        if on_nonfinite not in ("error", "warn", "ignore"):
            raise ValueError(f"divergence.on_nonfinite must be 'error', 'warn' or 'ignore', got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self._warned = False

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self.on_nonfinite == "ignore":
            return
        nonfinite = not bool(torch.isfinite(loss.detach()).all())
        # under DDP every process stops together (a rank that stops alone would hang the others)
        if trainer.strategy.reduce_boolean_decision(nonfinite, all=False):
            value = loss.detach().flatten()[0].item()
            self._report(trainer, f"the training loss is {value}", "before this step's update")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.on_nonfinite == "ignore":
            return
        name = first_nonfinite_tensor(pl_module)
        if trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            self._report(trainer, f"the weights are not finite ({name or 'on another process'})", "after this step")

    def _report(self, trainer: Trainer, what: str, when: str) -> None:
        message = (
            f"training diverged at step {trainer.global_step} (epoch {trainer.current_epoch}, {when}): {what}; "
            f"{learning_rates(trainer)}."
        )
        if self.on_nonfinite == "error":
            raise NonFiniteError(
                f"{message} Lower the learning rate (model.init_args.optimizer.init_args.lr), or set "
                f"divergence.on_nonfinite=warn (train on) or ignore to study the divergence."
            )
        if not self._warned:
            self._warned = True
            rank_zero_warn(
                f"{message} Training goes on (divergence.on_nonfinite=warn); checkpoints keep the last finite weights."
            )
