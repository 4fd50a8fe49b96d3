"""Test helpers (callbacks named by ``class_path`` in test configs; ``tests/`` must be on the path).

``ResumeProbe`` records where training starts (epoch, step), the model's layer types and weights,
and the optimizer state, at ``on_train_start``.

``BatchMeanProbe(layer, out_dir)`` watches the first training forward of ``layer`` (a normlightning
batch layer whose running mean starts at 0 with momentum ``m``) and writes ``rank<r>.json`` with

* ``local``: the mean of this rank's input over the layer's set, computed here from the input
  (per group of the flattened ``(C, S)`` for ``bgn``: ``x.reshape(N, G, -1).mean((0, 2))``);
* ``used``: the batch mean the layer actually normalized with, read back from its running mean
  after that step: ``running_mean = (1 - m) * 0 + m * used``, so ``used = running_mean / m``;
* ``second``: the running mean the layer holds when its second training forward starts (after
  DDP's buffer broadcast from rank 0, when ``broadcast_buffers`` is on), if there is one.

``FinitenessProbe``, ``PoisonWeights(epoch)`` and ``SignalAt(step, name)`` serve the tests of runs
that diverge or are stopped (tests/test_run_failures.py).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch import Callback


class ResumeProbe(Callback):
    def on_train_start(self, trainer, pl_module):
        self.epoch, self.step = trainer.current_epoch, trainer.global_step
        self.types = {n: type(m) for n, m in pl_module.named_modules()}
        optimizer = trainer.optimizers[0]
        self.opt_state = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()}
        self.group_names = [g.get("name") for g in optimizer.param_groups]
        self.lrs = [g["lr"] for g in optimizer.param_groups]
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


class BatchMeanProbe(Callback):
    def __init__(self, layer: str, out_dir: str) -> None:
        self.layer_name = layer
        self.out_dir = Path(out_dir)
        self.local: list[float] | None = None
        self.used: list[float] | None = None
        self.second: list[float] | None = None
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        layer = pl_module.get_submodule(self.layer_name)
        assert float(layer.running_mean.abs().sum()) == 0.0, "probe needs a fresh running mean"

        def hook(module, args):
            if not module.training:
                return
            self.calls += 1
            if self.calls == 1:
                x = args[0].detach().float()
                groups = getattr(module, "num_groups", x.shape[1])
                self.local = x.reshape(x.shape[0], groups, -1).mean((0, 2)).tolist()
            elif self.calls == 2:
                self.second = module.running_mean.detach().float().tolist()

        self.handle = layer.register_forward_pre_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.used is None:
            layer = pl_module.get_submodule(self.layer_name)
            self.used = (layer.running_mean.detach().float() / layer.momentum).tolist()
            self.sync = bool(getattr(layer, "sync_statistics", False))
            self.type = type(layer).__name__

    def on_train_end(self, trainer, pl_module):
        self.handle.remove()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "local": self.local,
            "used": self.used,
            "second": self.second,
            "sync": self.sync,
            "type": self.type,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class FinitenessProbe(Callback):
    """Records, per training step, whether the loss (before backward) and every tensor of the
    model's ``state_dict`` (after the step) are finite: ``loss_finite`` and ``weights_finite``,
    lists of ``(global_step, bool)``."""

    def __init__(self) -> None:
        self.loss_finite: list[tuple[int, bool]] = []
        self.weights_finite: list[tuple[int, bool]] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.loss_finite.append((trainer.global_step, bool(torch.isfinite(loss).all())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        finite = all(bool(torch.isfinite(t).all()) for t in pl_module.state_dict().values() if t.is_floating_point())
        self.weights_finite.append((trainer.global_step, finite))


class PoisonWeights(Callback):
    """Sets the model's first parameter to NaN at the start of training epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class SignalAt(Callback):
    """Sends the signal ``name`` (``SIGTERM``, as a batch scheduler would, or ``SIGINT``, as Ctrl+C
    would) to this process after training step ``step``; refuses when no handler would catch it
    (the default action would kill the test process)."""

    def __init__(self, step: int, name: str = "SIGTERM") -> None:
        self.step = step
        self.signal = getattr(signal, name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if signal.getsignal(self.signal) in (signal.SIG_DFL, signal.SIG_IGN, None):
                raise RuntimeError(f"SignalAt: no handler of {self.signal!r} is installed")
            os.kill(os.getpid(), self.signal)
