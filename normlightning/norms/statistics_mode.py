"""Run a model with its normalization layers computing statistics one chosen way.

Used where a forward must not be an ordinary training or evaluation forward: the PGD attack's
inner forwards (:class:`~normlightning.tasks.AdversarialTask`) and transductive few-shot
episodes (:class:`~normlightning.tasks.FewShotTask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from normlightning.norms.layer_kinds import is_norm_layer

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
    syncs = [(m, m.sync_statistics) for m in model.modules() if hasattr(m, "sync_statistics")] if sync is not None else []
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
