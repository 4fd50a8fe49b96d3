"""Batch Norm and Batch Renormalization layers: modules over ``functional`` (arguments, buffers, BRN's schedule)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm, ChannelStatisticsMixin, ExampleWeighingMixin


class BatchNorm(ExampleWeighingMixin, ChannelStatisticsMixin, BatchStatNorm):
    """Batch Normalization (Ioffe & Szegedy, ICML 2015), registry name ``bn``.

    ``y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c`` with ``mu_c, var_c`` (biased) over
    ``(N, S)`` in training; running statistics ``running_mean``/``running_var`` of shape
    ``(C,)`` (unbiased variance, PyTorch momentum) in eval. With ``alpha > 0`` at inference:
    ``mu = (1-a) mu_pop + a mu_ex``, ``var = (1-a)(var_pop + mu_pop^2) + a E_ex[x^2] - mu^2``
    with ``_ex`` over the example's ``S`` (Summers & Dinneen 2020).

    ``track_running_stats=False`` (as ``torch.nn.BatchNorm2d``'s): ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are ``None`` and eval normalizes with the batch
    statistics too (biased ``var_c`` over ``(N, S)``); ``alpha`` must then stay 0 (there is no
    population to weigh the example against).

    Shape: input ``(N, C, *)`` with 0 to 3 spatial dims, output the same.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        alpha: float = 0.0,
        device=None,
        dtype=None,
        track_running_stats: bool = True,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, track_running_stats, virtual_devices)
        self._init_alpha(alpha, device)
        self._check_population_for_alpha()
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.reset_parameters()

    def _channel_statistics_obstacle(self) -> str | None:
        """``track_running_stats=False`` (each batch's own statistics) or ``alpha > 0``."""
        if not self.track_running_stats:
            return (
                "BatchNorm with track_running_stats=False normalizes with each batch's statistics at inference; "
                "it has no constant statistics per channel"
            )
        return self._example_weighing_obstacle()

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.running_mean, self.running_var

    def _check_population_for_alpha(self) -> None:
        """``ValueError`` when ``alpha > 0`` without running statistics to weigh the example against."""
        if not self.track_running_stats and self._alpha != 0.0:
            raise ValueError(
                f"BatchNorm with track_running_stats=False has no running statistics for alpha={self._alpha} "
                "(inference example weighing) to mix with; set alpha = 0 or track_running_stats=True"
            )

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        self._check_population_for_alpha()
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        factor = self._momentum_factor()
        batch_statistics = self.training or not self.track_running_stats
        return NF.batch_norm(
            x,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=batch_statistics,
            factor=factor,
            eps=self.eps,
            alpha=self.alpha,
            sync=self.sync_statistics and self.training,  # as SyncBatchNorm: no collective in eval
            process_group=self.process_group,
        )


class BatchRenorm(ChannelStatisticsMixin, BatchStatNorm):
    """Batch Renormalization (Ioffe, NeurIPS 2017), registry name ``brn``.

    ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = sg(clip(sigma_B / sigma_run, 1/r_max, r_max))``,
    ``d = sg(clip((mu_B - mu_run) / sigma_run, -d_max, d_max))``, ``y = gamma_c x_hat + beta_c``.
    ``r_max`` ramps linearly from 1 to ``r_max`` and ``d_max`` from 0 to ``d_max`` between the
    given step counts (the paper: ``r_max`` 1 for 5k steps then to 3 by 40k, ``d_max`` to 5 by
    25k). The step counter is the buffer ``renorm_step`` (survives checkpoints and is the same
    on every DDP rank); it advances once per training forward. Eval: BN with running stats.

    Attribute ``renorm_reference``: ``None``, or ``(mean, var)`` that ``r, d`` use instead of the
    running statistics (not saved). :func:`~normlightning.callbacks.recalibrate_statistics` sets
    it to the trained statistics while it rebuilds the running ones from their reset values, so
    the layer's outputs during the pass are those of training, not of ``r, d`` against a reset
    average.

    Shape: input ``(N, C, *)``, output the same.
    """

    #: ``(mean, var)`` for ``r, d`` in place of the running statistics; ``None``: the running ones.
    renorm_reference: tuple[Tensor, Tensor] | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        r_max_start_step: int = 5000,
        r_max_end_step: int = 40000,
        d_max_start_step: int = 5000,
        d_max_end_step: int = 25000,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"BatchRenorm: need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}.")
        for a, b, n in ((r_max_start_step, r_max_end_step, "r_max"), (d_max_start_step, d_max_end_step, "d_max")):
            if a < 0 or b < a:
                raise ValueError(f"BatchRenorm: the {n} ramp needs 0 <= {n}_start_step <= {n}_end_step, got {a}, {b}.")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.r_max_start_step, self.r_max_end_step = int(r_max_start_step), int(r_max_end_step)
        self.d_max_start_step, self.d_max_end_step = int(d_max_start_step), int(d_max_end_step)
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.register_buffer("renorm_step", torch.tensor(0, dtype=torch.long, device=device))
        # rows slope, offset, low, high of the ramps of r_max, d_max and -d_max (see _limits; not saved)
        ramps = [self._ramp(self.r_max_start_step, self.r_max_end_step, 1.0, self.r_max)]
        ramps.append(self._ramp(self.d_max_start_step, self.d_max_end_step, 0.0, self.d_max))
        ramps.append(self._ramp(self.d_max_start_step, self.d_max_end_step, 0.0, -self.d_max))
        table = torch.tensor(ramps, dtype=torch.float32, device=device).t().contiguous()
        self.register_buffer("limit_ramps", table, persistent=False)
        self.reset_parameters()

    @staticmethod
    def _ramp(start: int, end: int, lo: float, hi: float) -> tuple[float, float, float, float]:
        """``(slope, offset, low, high)`` with ``clamp(step * slope + offset, low, high)`` equal to ``lo``
        up to step ``start``, ``hi`` from step ``end`` on and linear in between (for integer steps; a
        step at ``start`` when ``end == start``); ``low, high`` are ``lo, hi`` in increasing order."""
        slope = (hi - lo) / (end - start) if end > start else hi - lo
        at_lo = start if end > start else start - 1  # the last step at lo
        return slope, lo - slope * at_lo, min(lo, hi), max(lo, hi)

    def _limits(self) -> Tensor:
        """``(r_max, d_max, -d_max)`` at the current ``renorm_step``, ``(3,)`` (float32 unless the
        module was cast to float64): the three ramps in one multiply-add and one clamp (issue 23)."""
        ramps = self.limit_ramps if self.limit_ramps.dtype.itemsize >= 4 else self.limit_ramps.float()
        slope, offset, low, high = ramps
        return torch.addcmul(offset, self.renorm_step, slope).clamp_(low, high)

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` at the current ``renorm_step`` (0-d float tensors)."""
        limits = self._limits()
        return limits[0], limits[1]

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The running statistics (eval is BN)."""
        return self.running_mean, self.running_var

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        if self._evaluates_by_channel():  # BN with the running statistics
            return self._inference_by_channel(x)
        r_max, d_max, d_min = self._limits()
        factor = self._momentum_factor()
        y = NF.batch_renorm(
            x,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            r_max=r_max,
            d_max=d_max,
            factor=factor,
            eps=self.eps,
            sync=self.sync_statistics,
            process_group=self.process_group,
            reference=self.renorm_reference,
            d_min=d_min,
        )
        self.renorm_step.add_(1)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}"
