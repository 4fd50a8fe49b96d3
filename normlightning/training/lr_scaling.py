"""Linear learning-rate scaling (Goyal et al. 2017), as the BGN and HN papers set their LR.

    lr = base_lr * batch_size * world_size / base_batch_size

``base_lr`` is the optimizer's configured ``lr`` (per group), ``batch_size`` the per-process batch,
``world_size`` the number of processes (GPUs x nodes), ``base_batch_size`` the total batch the
base LR was tuned for (256 for ImageNet in Goyal et al.).  ``BaseTask`` applies it when its
``lr_base_batch_size`` is set, right after building the optimizer and before the LR scheduler,
so schedulers start from the scaled LR.
"""

from __future__ import annotations

import torch


def linear_lr_factor(batch_size: int, world_size: int, base_batch_size: int) -> float:
    """``batch_size * world_size / base_batch_size``."""
    for name, value in (
        ("batch_size", batch_size),
        ("world_size", world_size),
        ("lr_base_batch_size", base_batch_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"linear LR scaling: {name} must be a positive int, got {value!r}")
    return batch_size * world_size / base_batch_size


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> list[float]:
    """Multiply every group's ``lr`` by ``factor`` in place; return the new LRs."""
    if factor <= 0:
        raise ValueError(f"LR scale factor must be > 0, got {factor}")
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    return [g["lr"] for g in optimizer.param_groups]
