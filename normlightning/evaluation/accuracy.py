"""Evaluating a model outside the Trainer loop, for the post-training tools (recalibration,
example weighing): how to feed a batch to the model, where its targets are, top-1 accuracy
over a loader, and which loader of a run to use."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer
from torch import nn

__all__ = [
    "ForwardFn",
    "TargetFn",
    "default_forward",
    "default_target",
    "evaluate_accuracy",
    "model_device",
    "trainer_dataloader",
]

#: ``(model, batch) -> logits (N, num_classes)`` (or any output, for a pass that only updates statistics).
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``batch -> targets (N,)`` (class indices).
TargetFn = Callable[[Any], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    raise TypeError(
        f"default_forward: cannot find the inputs in a batch of type {type(batch).__name__}; "
        "batches must be a tensor or an (inputs, targets, ...) sequence, otherwise pass "
        "`forward_fn=lambda model, batch: model(...)`"
    )


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Move ``batch`` to the model's device and return ``model(inputs)``.

    ``inputs`` is ``batch`` itself when it is a tensor, else ``batch[0]`` (the usual
    ``(x, y)`` pair). For a ``ClassificationTask`` this is ``backbone(normalize(x))``:
    logits of shape ``(N, num_classes)``.
    """
    return model(move_data_to_device(_inputs(batch), model_device(model)))


def default_target(batch: Any) -> torch.Tensor:
    """Targets of an ``(inputs, targets, ...)`` batch: ``batch[1]``, class indices ``(N,)``."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(
        f"default_target: batches of type {type(batch).__name__} have no targets at index 1; "
        "pass `target_fn=lambda batch: ...`"
    )


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataloader: Iterable[Any],
    forward_fn: ForwardFn | None = None,
    target_fn: TargetFn | None = None,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` in ``eval()`` mode: ``#{argmax(logits) == y} / #examples``.

    Args:
        model: returns logits ``(N, num_classes)`` through ``forward_fn``.
        dataloader: iterable of batches.
        forward_fn: ``(model, batch) -> logits``; default :func:`default_forward`.
        target_fn: ``batch -> targets (N,)``; default :func:`default_target`.
        max_batches: stop after this many batches (default: all).

    The model's ``training`` flags are restored afterwards.
    """
    forward_fn = forward_fn or default_forward
    target_fn = target_fn or default_target
    flags = {m: m.training for m in model.modules()}
    model.eval()
    correct, total = 0, 0
    try:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            logits = forward_fn(model, batch)
            target = target_fn(batch).to(logits.device)
            correct += int((logits.argmax(dim=-1) == target).sum())
            total += int(target.numel())
    finally:
        for module, flag in flags.items():
            module.training = flag
    if total == 0:
        raise ValueError("evaluate_accuracy: the dataloader yielded no examples; give it a non-empty loader")
    return correct / total


def trainer_dataloader(trainer: Trainer, split: Literal["train", "val"]) -> Any:
    """The ``split`` loader of a run: a fresh one from ``trainer.datamodule`` (so an ongoing epoch
    is not disturbed) when it has ``<split>_dataloader()``, else the trainer's own loader (the
    first one when there are several); ``None`` when there is none."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        method = getattr(datamodule, f"{split}_dataloader", None)
        if method is not None:
            try:
                return method()
            except NotImplementedError:
                pass
    loaders = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders
