"""Check at setup that the epoch's last, incomplete training batch can be normalized.

A training set of 1,079 images at batch 154 ends every epoch with a batch of one example, which
batch-statistic layers cannot normalize; without this check the run would fail after a whole
epoch. :func:`check_last_training_batch` runs the model once on that last batch (statistics
frozen, no gradients, the global RNG untouched) and turns a failure into an error that names
``data.drop_last``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from normlightning.norms.model_walk import has_batch_sets, statistics_mode

__all__ = ["check_last_training_batch", "last_batch_size"]


def last_batch_size(num_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Size of each process's last training batch (0: the batches are full).

    Under DDP the distributed sampler gives every process ``ceil(num_examples / world_size)``
    examples (padding by repetition), as Lightning's default sampler does.
    """
    per_process = math.ceil(num_examples / world_size)
    return per_process % batch_size


def _inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def check_last_training_batch(model: nn.Module, loader: Any, world_size: int = 1) -> None:
    """Raise a clear error when ``model`` cannot train on ``loader``'s last incomplete batch.

    Only for a ``DataLoader`` with a sized dataset, a plain ``batch_size`` and ``drop_last=False``,
    and a model with batch-statistic layers; anything else returns at once.

    Raises:
        ValueError: naming the last batch's size and ``data.drop_last``.
    """
    if not isinstance(loader, DataLoader) or loader.drop_last or loader.batch_size is None:
        return
    if not any(has_batch_sets(m) for m in model.modules()):
        return
    try:
        num_examples = len(loader.dataset)
    except TypeError:
        return
    last = last_batch_size(num_examples, loader.batch_size, world_size)
    if last == 0:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]), torch.no_grad(), statistics_mode(model, "train_frozen"):
        batch = loader.collate_fn([loader.dataset[i] for i in range(last)])
        try:
            model(_inputs(batch).to(device))
        except ValueError as err:
            per_process = f" per process ({world_size} processes)" if world_size > 1 else ""
            raise ValueError(
                f"the last training batch of every epoch holds {last} example(s) ({num_examples} training "
                f"examples{per_process}, batch_size {loader.batch_size}), and the model cannot train on it: {err} "
                f"Set data.drop_last: true to drop the incomplete last batch, or choose a batch size that leaves "
                f"a larger remainder."
            ) from err
