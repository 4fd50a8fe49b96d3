"""Per-channel input normalization as the model's first module.

Data stays in pixel space ``[0, 1]`` (so attacks and augmentations work in pixel units);
the model standardizes it: ``y[:, c] = (x[:, c] - mean[c]) / std[c]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, for ``x`` of shape ``(N, C, *spatial)``.

    ``mean`` and ``std`` are non-trainable buffers of shape ``(C,)`` (saved in checkpoints).

    Args:
        mean: per-channel means (length ``C``).
        std: per-channel standard deviations (length ``C``, all > 0).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(
                f"input_mean and input_std must be per-channel lists of equal length, got {list(mean)} and {list(std)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"input_std must be > 0 for every channel, got {list(std)}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, *spatial)`` -> same shape, standardized per channel."""
        if x.ndim < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(
                f"InputNormalization expects (N, {self.mean.numel()}, ...) inputs, got shape {tuple(x.shape)}"
            )
        view = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(view).to(x.dtype)) / self.std.view(view).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
