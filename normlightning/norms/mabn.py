"""Moving Average Batch Normalization (MABN)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import BatchStatNorm
from .functional.mabn import moving_average_batch_norm


class MovingAverageBatchNorm(BatchStatNorm):
    """Moving Average Batch Normalization (Yan, Wan, Zhang, Zhang, Wei & Sun, ICLR 2020), registry
    name ``mabn``.

    BN without centering, whose forward normalizes with moving averages of the per-channel second
    moment ``x2 = mean_{n,s} x²`` and whose backward replaces the batch statistic ``mean(g · z)``
    by its moving average over the last ``buffer_size`` iterations (docs/methods.md, section
    "mabn", which gives the formulas). The mean is not subtracted: the paper centres the weights of
    the convolution before each MABN instead (``norm.weight_centering: true`` in the ``norm:``
    section, :func:`~normlightning.norms.apply_weight_centering`).

    Args:
        num_features: ``C``.
        buffer_size: ``m``, the iterations averaged (the official code's ``real_B / B``: the batch
            to simulate over the per-device batch). Required: no value fits every batch size.
        eps: added to the second moment inside the root.
        momentum: running-average factor of ``running_x2`` (PyTorch convention; the official
            code's decay 0.98 is ``momentum=0.02``, the default); ``None``: cumulative average.
        affine: learn ``gamma``/``beta``.
        warmup_iters: iterations that normalize with the current batch's ``x2`` (and its ``gz``).
        renorm_start_step: ``r = 1`` (the window statistics) up to ``max(renorm_start_step,
            warmup_iters)``; afterwards ``r`` scales toward ``running_x2``, clipped to ``r_max``.
        r_max: the clip of ``r`` (``[1/r_max, r_max]``).

    Buffers: ``running_x2`` ``(C,)`` (init 1; the official ``running_var``, a second moment: named
    apart from BN's variance so that the injection does not copy one into the other),
    ``moving_x2`` and ``moving_gz`` ``(m, C)`` (init 0), ``mabn_step`` (the step ``t`` of the
    windows, its own counter: ``num_batches_tracked`` may be copied from a trained BatchNorm) and
    ``num_batches_tracked``. Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(
        self,
        num_features: int,
        buffer_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        warmup_iters: int = 100,
        renorm_start_step: int = 1000,
        r_max: float = 5.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype)
        if buffer_size is None or isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(
                f"MovingAverageBatchNorm needs buffer_size, the number of iterations its statistics average (the "
                f"batch to simulate / the per-device batch, e.g. 16 for 32 over 2), a positive int; "
                f"got {buffer_size!r}. "
                "Pass it in norm.kwargs: {buffer_size: 16}"
            )
        for name, value in (("warmup_iters", warmup_iters), ("renorm_start_step", renorm_start_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"MovingAverageBatchNorm: {name} must be an int >= 0, got {value!r}.")
        if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or r_max < 1:
            raise ValueError(f"MovingAverageBatchNorm: r_max must be a float >= 1, got {r_max!r}.")
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.renorm_start_step = renorm_start_step
        self.r_max = float(r_max)
        self._register_running("running_x2", (num_features,), 1.0)
        # the windows are training state, not running statistics: recalibration and virtual devices do not
        # average them (running_stat_names is ("running_x2",)); reset_running_stats empties them
        window_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name in ("moving_x2", "moving_gz"):
            self.register_buffer(name, torch.zeros(buffer_size, num_features, dtype=window_dtype, device=device))
        self.register_buffer("mabn_step", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """The running buffers back to their initial values, ``num_batches_tracked``, ``mabn_step`` and the
        windows ``moving_x2``/``moving_gz`` to 0 (the windows refill)."""
        super().reset_running_stats()
        for name in ("moving_x2", "moving_gz", "mabn_step"):
            if name in self._buffers:
                self._buffers[name].zero_()

    def inference_channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The mean and variance per channel ``(C,)`` this layer normalizes with at inference: ``0``
        (no centering) and the second moment ``running_x2`` (``fold_norms`` folds it)."""
        return torch.zeros_like(self.running_x2), self.running_x2

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.sync_statistics and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise ValueError(
                "MovingAverageBatchNorm has no synchronized statistics (its moving averages replace them); "
                "turn off the sync plugin (norm.sync: false) for this method"
            )
        factor = self._momentum_factor()
        if self.training:
            self.mabn_step.add_(1)
        return moving_average_batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_x2,
            self.moving_x2,
            self.moving_gz,
            training=self.training,
            step=int(self.mabn_step) if self.training else 0,  # (eval reads no step: no device sync)
            warmup_iters=self.warmup_iters,
            renorm_start_step=self.renorm_start_step,
            r_max=self.r_max,
            factor=factor,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", buffer_size={self.buffer_size}, warmup_iters={self.warmup_iters}"
