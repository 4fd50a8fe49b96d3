"""Recalibration of running statistics (PreciseBN-style) and a callback that runs it.

Layers that normalize over a set containing the batch axis keep running estimates of
their statistics for inference. The exponential moving average (momentum 0.1) mixes
statistics of *old* weights and is noisy for small batches: a gap between training and
inference behaviour (Four Things §1). :func:`recalibrate_statistics` replaces the
running estimates by a **cumulative (equal-weight) average over K batches** with the
final weights, PyTorch's ``momentum=None`` convention::

    running_mean = (1/K) * sum_k mean_k            # mean_k: batch mean of batch k
    running_var  = (1/K) * sum_k var_k^unbiased     # n/(n-1)-corrected batch variance
    num_batches_tracked = K

What is touched: only the running buffers of the batch-statistic layers. No weight
changes (``torch.no_grad``, no optimizer); other buffers of those layers (e.g. ``brn``'s
schedule counter ``renorm_step``) are restored, see :func:`running_buffer_names`.

Modes during the pass: the batch-statistic layers are in ``train()`` (that is when they update their running
statistics, with
``momentum=None``); **every other module is in** ``eval()`` (dropout off, stochastic
depth off, other layers' inference behaviour), so the recomputed statistics are those of
the activations the model sees at inference. ``brn`` computes its corrections ``r, d`` against
its trained running statistics during the pass (``BatchRenorm.renorm_reference``), not against
the averages being rebuilt from their reset values. Afterwards every module's ``training``
flag and every layer's ``momentum`` are restored; if the pass raises, the running
buffers are restored too.

Batch-statistic layers: ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
SyncBatchNorm) with ``track_running_stats=True``, and any module whose class attribute
``uses_batch_statistics`` is True (normlightning's ``bn``, ``ghost``, ``bgn``, ``gbgn``,
``seqnorm``, ``hn`` with batch sets, ``sn``, ``brn``) and that has
``reset_running_stats()`` and ``momentum``.

Distributed: each process recalibrates on the batches it is given; the callback then averages
the statistics over the processes (``sync=True``, default), so every rank and every checkpoint
holds the same recalibrated statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from normlightning.evaluation.accuracy import ForwardFn, default_forward, evaluate_accuracy, trainer_dataloader
from normlightning.evaluation.progress import counted, loader_length, progress_bar, trainer_shows_progress
from normlightning.norms.model_walk import is_batch_statistic_layer

__all__ = [
    "Recalibration",
    "average_running_statistics",
    "batch_statistic_layers",
    "recalibrate_statistics",
    "running_buffer_names",
]


# ----------------------------------------------------------------------------- helpers
def running_buffer_names(layer: nn.Module) -> set[str]:
    """Names (in ``layer.state_dict()``) of the buffers a recalibration may change.

    normlightning's batch-statistic layers list theirs in ``running_stat_names``; native
    BatchNorm (and unknown layers) use ``running_mean``, ``running_var``. The step counter
    ``num_batches_tracked`` is always included. Every other buffer (e.g. ``brn``'s
    ``renorm_step`` schedule counter) is restored after the pass.
    """
    names = getattr(layer, "running_stat_names", ("running_mean", "running_var"))
    return set(names) | {"num_batches_tracked"}


def batch_statistic_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified_name: layer}`` of the outermost batch-statistic layers in ``model``.

    A batch-statistic layer nested inside another one (e.g. the ghost stage of a
    composite layer) is left to its parent, whose ``reset_running_stats()`` and
    ``momentum`` are responsible for it.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_batch_statistic_layer(module):
            continue
        if any(name.startswith(parent + ".") for parent in found):
            continue
        found[name] = module
    return found


# ------------------------------------------------------------------------ the function
@torch.no_grad()
def recalibrate_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = False,
    below_main_bar: bool = False,
) -> int:
    """Recompute the running statistics of every batch-statistic layer over ``num_batches``.

    Per layer: ``reset_running_stats()``, ``momentum = None`` (cumulative average), then
    ``forward_fn(model, batch)`` for each of the first ``num_batches`` batches, so that
    afterwards ``running_mean = mean_k(batch mean_k)`` and ``running_var =
    mean_k(unbiased batch var_k)`` (PyTorch's convention; each layer defines its own set).
    See the module docstring for the modes of the other modules; weights are untouched.

    Args:
        model: any ``nn.Module`` (e.g. a LightningModule).
        batches: iterable of training batches (a DataLoader); finite if ``num_batches`` is None.
        num_batches: K, how many batches to use (default: all of ``batches``). Fewer
            available -> a warning and all of them are used.
        forward_fn: ``(model, batch) -> Any``; default :func:`~normlightning.evaluation.accuracy.default_forward`.
        progress: draw a progress bar over the batches (:mod:`normlightning.evaluation.progress`).
        below_main_bar: draw it below Lightning's training bar (inside ``fit``).

    Returns:
        The number of batches used (0 when the model has no batch-statistic layer).
    """
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"recalibrate_statistics: num_batches must be a positive int or None, got {num_batches!r}")
    forward_fn = forward_fn or default_forward
    layers = batch_statistic_layers(model)
    if not layers:
        rank_zero_warn("recalibrate_statistics: the model has no batch-statistic layer; nothing to recalibrate.")
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {name: layer.momentum for name, layer in layers.items()}
    saved = {name: {k: v.clone() for k, v in layer.state_dict().items()} for name, layer in layers.items()}
    used = 0
    available = loader_length(batches)
    total = num_batches if available is None else min(available, num_batches or available)
    bar = progress_bar("Recalibration", total, progress, below_main_bar=below_main_bar)
    try:
        model.eval()
        for layer in layers.values():
            if hasattr(layer, "renorm_reference"):  # brn: r, d against the trained statistics
                layer.renorm_reference = (layer.running_mean.clone(), layer.running_var.clone())
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        for batch in counted(batches, bar):
            if num_batches is not None and used >= num_batches:
                break
            forward_fn(model, batch)
            used += 1
        if used == 0:
            raise ValueError("recalibrate_statistics: `batches` yielded no batch; give it a non-empty loader")
        if num_batches is not None and used < num_batches:
            rank_zero_warn(f"recalibrate_statistics: asked for {num_batches} batches, the loader had {used}.")
        for name, layer in layers.items():  # keep the new running stats, restore every other buffer
            keep = running_buffer_names(layer)
            state = layer.state_dict()
            state.update({k: v for k, v in saved[name].items() if k not in keep})
            layer.load_state_dict(state)
    except BaseException:
        for name, layer in layers.items():
            layer.load_state_dict(saved[name])
        raise
    finally:
        bar.close()
        for name, layer in layers.items():
            layer.momentum = momenta[name]
            if hasattr(layer, "renorm_reference"):
                layer.renorm_reference = None
        for module, flag in flags.items():
            module.training = flag
    return used


def average_running_statistics(model: nn.Module, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Replace every floating running statistic of ``model``'s batch-statistic layers by
    ``reduce_mean(statistic)`` (e.g. the mean over DDP processes); returns how many were reduced.

    Counters (``num_batches_tracked``) and non-statistic buffers are left as they are.
    """
    count = 0
    with torch.no_grad():
        for layer in batch_statistic_layers(model).values():
            buffers = dict(layer.named_buffers())
            for name in sorted(running_buffer_names(layer) - {"num_batches_tracked"}):
                buffer = buffers.get(name)
                if buffer is not None and buffer.is_floating_point():
                    buffer.copy_(reduce_mean(buffer.detach().clone()))
                    count += 1
    return count


def _is_final_training_batch(trainer: Trainer, batch_idx: int) -> bool:
    """Whether the batch just trained on is the fit's last (``max_steps`` reached, or the last
    batch of the last epoch)."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and batch_idx + 1 >= trainer.num_training_batches


# ------------------------------------------------------------------------ the callback
_WHEN = ("train_end", "validation_start", "test_start")

#: How many training batches :class:`Recalibration` uses when ``num_batches`` is not given (fewer if the loader
#: is shorter).
DEFAULT_RECALIBRATION_BATCHES = 100


class Recalibration(Callback):
    """Recalibrate running statistics on the training data at chosen moments.

    Args:
        num_batches: K training batches for the cumulative average. ``None`` (default): up to
            :data:`DEFAULT_RECALIBRATION_BATCHES` (100), all of a shorter loader without a warning; an int
            asks for exactly K and warns when the loader has fewer.
        when: one or several of ``"train_end"`` (once, right after the last training step, so
            the final validation and every checkpoint written after it hold the recalibrated
            statistics; a run stopped early is recalibrated at its end and its ``last.ckpt``
            rewritten; later ``validate``/``test`` calls in the same process use the result),
            ``"validation_start"`` (before every validation run, including sanity
            check), ``"test_start"``.
        report_accuracy: also measure top-1 accuracy on the validation loader before
            and after (costs two passes over it); logged as ``recalibration/acc_before``
            and ``recalibration/acc_after``.
        forward_fn: ``(model, batch) -> logits``; default :func:`~normlightning.evaluation.accuracy.default_forward`.
        sync: under DDP, average the recalibrated statistics over the processes (each process
            recalibrates on its own batches; the average is over ``K * world_size`` batches).
            ``False`` keeps each process's own result (checkpoints hold rank 0's).

    Logged (to every logger): ``recalibration/num_batches`` (+ accuracies). The last
    result is kept in :attr:`last_result`. While it runs, a progress bar (when the run shows
    Lightning's); then one line, e.g. ``Recalibration: 100 batches in 2.1 s, val acc 0.9120 -> 0.9340``.

    Training batches come from ``trainer.datamodule.train_dataloader()`` (a fresh loader,
    so an ongoing training epoch is not disturbed), else ``trainer.train_dataloader``.
    Without a DistributedSampler every process sees the loader's own order.
    """

    #: Set once ``train_end`` recalibration has run in this fit.
    _done_for_fit: bool = False

    def __init__(
        self,
        num_batches: int | None = None,
        when: Literal["train_end", "validation_start", "test_start"] | list[str] = "train_end",
        report_accuracy: bool = False,
        forward_fn: ForwardFn | None = None,
        sync: bool = True,
    ) -> None:
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"Recalibration: num_batches must be a positive int or null, got {num_batches!r}")
        when_list = [when] if isinstance(when, str) else list(when)
        bad = [w for w in when_list if w not in _WHEN]
        if bad or not when_list:
            raise ValueError(f"Recalibration: when={when!r} is not valid; choose from {list(_WHEN)}")
        self.num_batches = num_batches
        self.when = tuple(when_list)
        self.report_accuracy = report_accuracy
        self.forward_fn = forward_fn
        self.sync = sync
        self.last_result: dict[str, float] | None = None

    # hooks --------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._done_for_fit = False

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "train_end" in self.when and not self._done_for_fit and _is_final_training_batch(trainer, batch_idx):
            self.recalibrate(trainer, pl_module)
            self._done_for_fit = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "train_end" in self.when and not self._done_for_fit:  # stopped early (e.g. EarlyStopping)
            self.recalibrate(trainer, pl_module)
            self._done_for_fit = True
            for callback in trainer.checkpoint_callbacks:
                path = getattr(callback, "last_model_path", "")
                if path:
                    trainer.save_checkpoint(path)
                    rank_zero_info(f"Recalibration: rewrote {path} with the recalibrated statistics")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "validation_start" in self.when:
            self.recalibrate(trainer, pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "test_start" in self.when:
            self.recalibrate(trainer, pl_module)

    # work ---------------------------------------------------------------------------
    def recalibrate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run :func:`recalibrate_statistics` on the training data; log and return the result.

        Skipped (returns ``{}``) during Lightning's sanity check, before any training.
        """
        if trainer.sanity_checking:
            return {}
        train_loader = trainer_dataloader(trainer, "train")
        if train_loader is None:
            raise RuntimeError(
                "Recalibration: no training dataloader; use a DataModule with train_dataloader() or run trainer.fit"
            )
        result: dict[str, float] = {}
        start = time.perf_counter()
        val_loader = trainer_dataloader(trainer, "val") if self.report_accuracy else None
        if self.report_accuracy and val_loader is None:
            rank_zero_warn("Recalibration: report_accuracy=True but there is no validation dataloader.")
        show, below = trainer_shows_progress(trainer), trainer.state.fn == "fit"

        def val_accuracy(desc: str) -> float:
            bar = progress_bar(desc, loader_length(val_loader), show, below_main_bar=below)
            try:
                return evaluate_accuracy(pl_module, counted(val_loader, bar), self.forward_fn)
            finally:
                bar.close()

        if val_loader is not None:
            result["recalibration/acc_before"] = val_accuracy("Recalibration: val acc before")
        num_batches = self.num_batches
        if num_batches is None:
            available = loader_length(train_loader)
            num_batches = (
                DEFAULT_RECALIBRATION_BATCHES if available is None else min(available, DEFAULT_RECALIBRATION_BATCHES)
            )
        result["recalibration/num_batches"] = float(
            recalibrate_statistics(
                pl_module, train_loader, num_batches, self.forward_fn, progress=show, below_main_bar=below
            )
        )
        if self.sync and trainer.world_size > 1:
            average_running_statistics(pl_module, lambda t: trainer.strategy.reduce(t, reduce_op="mean"))
        if val_loader is not None:
            result["recalibration/acc_after"] = val_accuracy("Recalibration: val acc after")
        for logger in trainer.loggers:
            logger.log_metrics(result, step=trainer.global_step)
        line = (
            f"Recalibration: {int(result['recalibration/num_batches'])} batches in {time.perf_counter() - start:.1f} s"
        )
        if val_loader is not None:
            line += f", val acc {result['recalibration/acc_before']:.4f} -> {result['recalibration/acc_after']:.4f}"
        rank_zero_info(line)
        self.last_result = result
        return result
