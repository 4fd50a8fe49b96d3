"""Mean and 95% confidence interval of few-shot episode accuracies (what few-shot papers report)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["mean_confidence_interval"]


def mean_confidence_interval(accuracies: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean episode accuracy and its 95% confidence half-width (normal approximation).

    ``mean = sum(a) / n``, ``ci95 = 1.96 * std(a, ddof=1) / sqrt(n)``, the convention of
    the few-shot literature (e.g. 600 episodes, reported as ``mean +- ci95``).

    Args:
        accuracies: per-episode accuracies, at least two values (any units, e.g. % or [0, 1]).

    Returns:
        ``(mean, ci95)`` as Python floats.
    """
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    n = acc.numel()
    if n < 2:
        raise ValueError(f"mean_confidence_interval needs at least 2 episode accuracies, got {n}.")
    if not torch.isfinite(acc).all():
        raise ValueError("mean_confidence_interval got non-finite accuracies.")
    return float(acc.mean()), float(1.96 * acc.std(correction=1) / math.sqrt(n))
