"""A whole model's normalization layers: which modules are normalization layers, which keep
statistics of the batch, and running a model with its norm layers computing statistics one
chosen way.

One definition for every part of normlightning that treats norm layers specially (the
optimizer's parameter groups, the statistics monitor, recalibration, statistics sync), for
``torch.nn``'s layers and ours alike. :func:`statistics_mode` is used where a forward must not
be an ordinary training or evaluation forward: the PGD attack's inner forwards
(:class:`~normlightning.tasks.AdversarialTask`) and transductive few-shot episodes
(:class:`~normlightning.tasks.FewShotTask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normlightning.norms.base import NormLayer

#: torch's own normalization layers: BatchNorm*/SyncBatchNorm/InstanceNorm* (``_NormBase``),
#: GroupNorm, LayerNorm (and RMSNorm where torch has it).
NATIVE_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for a normalization layer: ours (:class:`NormLayer`, or a plugin class that declares
    ``uses_batch_statistics``) or one of :data:`NATIVE_NORM_TYPES`."""
    if isinstance(module, (NormLayer, *NATIVE_NORM_TYPES)):
        return True
    return isinstance(getattr(type(module), "uses_batch_statistics", None), bool)


def is_batch_statistic_layer(module: nn.Module) -> bool:
    """True for a layer that keeps running statistics of a set including the batch axis.

    Native BatchNorm with ``track_running_stats``, and our layers with ``uses_batch_statistics``
    (and ``reset_running_stats``; ``track_running_stats`` respected when a layer has it).
    """
    if isinstance(module, _BatchNorm):
        return bool(module.track_running_stats) and module.running_mean is not None
    if getattr(type(module), "uses_batch_statistics", False) is True:
        return getattr(module, "track_running_stats", True) is not False and hasattr(module, "reset_running_stats")
    return False


def has_batch_sets(module: nn.Module) -> bool:
    """True for a layer whose training sets include the batch axis, with running statistics or
    without (``track_running_stats=False``: batch statistics at inference too): native BatchNorm,
    and our layers whose class declares ``uses_batch_statistics``."""
    return isinstance(module, _BatchNorm) or getattr(type(module), "uses_batch_statistics", False) is True


StatisticsMode = Literal["eval", "train", "train_frozen"]
STATISTICS_MODES: dict[str, str] = {
    "eval": "running statistics, no buffer updates",
    "train": "batch statistics, running buffers updated",
    "train_frozen": "batch statistics, running buffers restored afterwards",
}


def check_statistics_mode(mode: str, setting: str) -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``mode`` is one of :data:`STATISTICS_MODES`."""
    if mode not in STATISTICS_MODES:
        raise ValueError(f"{setting} must be one of {sorted(STATISTICS_MODES)}, got {mode!r}")


@contextmanager
def statistics_mode(model: nn.Module, mode: StatisticsMode, *, sync: bool | None = None) -> Iterator[int]:
    """Inside the block, every normalization layer of ``model`` (:func:`is_norm_layer`) is in ``mode``.

    - ``eval``: ``.eval()``: running statistics where a layer has them;
    - ``train``: ``.train()``: batch statistics, and the forwards update the running buffers;
    - ``train_frozen``: as ``train``, and on exit every buffer of ``model`` (running means and
      variances, ``num_batches_tracked``, any other state) is written back to its value on entry.

    ``sync=False`` also turns off ``sync_statistics`` of our layers for the block (statistics of
    this process only, e.g. when processes see different few-shot episodes); ``None`` leaves it.
    (A native ``SyncBatchNorm`` in training mode still synchronizes.) Other modules keep their
    mode (dropout stays as the model has it). On exit, also after an error, every module's
    ``training`` flag and every changed sync flag are restored.

    Yields:
        The number of normalization layers switched.
    """
    check_statistics_mode(mode, "statistics_mode: mode")
    flags = [(module, module.training) for module in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train_frozen" else []
    syncs = (
        [(m, m.sync_statistics) for m in model.modules() if hasattr(m, "sync_statistics")] if sync is not None else []
    )
    try:
        layers = [module for module in model.modules() if is_norm_layer(module)]
        for layer in layers:
            layer.train(mode != "eval")
        for module, _ in syncs:
            module.sync_statistics = sync
        yield len(layers)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for module, training in flags:
            module.training = training
        for module, value in syncs:
            module.sync_statistics = value
