"""The batch + group normalization layer of "Four Things" (GBGN); its math is
:mod:`.functional.general_batch_group_norm`."""

from __future__ import annotations

from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm, ChannelStatisticsMixin, ExampleWeighingMixin
from .group_args import GroupArg, divisors


class GeneralBatchGroupNorm(ExampleWeighingMixin, ChannelStatisticsMixin, BatchStatNorm):
    """Batch + group normalization of "Four Things Everyone Should Know to Improve Batch
    Normalization" (Summers & Dinneen, ICLR 2020), registry name ``gbgn``.

    Training: examples in contiguous ghost groups of ``E = examples_per_group`` (``None`` =
    the whole batch) and channels in ``G_C = channel_groups`` groups (``None`` = ``C``); per
    block ``mu = E[x]``, ``var = max(E[x^2] - mu^2, 0)`` over ``(E, C/G_C, S)``;
    ``y = gamma_c (x - mu) / sqrt(var + eps) + beta_c``. ``E = N, G_C = C`` is BN,
    ``G_C = C`` is Ghost BN (contiguous ghost batches), ``E = 1`` is GN.

    Running statistics (the authors' code): raw per-channel moments ``moving_x`` (``E[x]``,
    init 0) and ``moving_x2`` (``E[x^2]``, init 1) over ``(N, S)``, decay 0.99, i.e.
    ``momentum = 0.01`` (``None`` = cumulative average); at inference they are averaged over
    each channel group and ``var = max(m2 - m1^2, 0)``. No unbiased correction (as the
    authors). ``alpha > 0`` mixes in the example's own moments over ``(C/G_C, S)``.

    Batch-size policy: a batch that ``E`` does not divide is cut into ``ceil(N/E)`` nearly
    equal contiguous groups; a set of one element raises ``ValueError``.

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (GroupArg("channel_groups", "channels", takes_num_groups=True, doc="channel groups G_C"),)

    def __init__(
        self,
        num_features: int,
        channel_groups: int | None = None,
        examples_per_group: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        alpha: float = 0.0,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        if channel_groups is None:
            channel_groups = num_features
        if (
            isinstance(channel_groups, bool)
            or not isinstance(channel_groups, int)
            or channel_groups < 1
            or num_features % channel_groups
        ):
            raise ValueError(
                f"GeneralBatchGroupNorm channel_groups={channel_groups!r} must divide the number of channels "
                f"C={num_features}; valid choices: {divisors(num_features)}."
            )
        if examples_per_group is not None and (
            isinstance(examples_per_group, bool) or not isinstance(examples_per_group, int) or examples_per_group < 1
        ):
            raise ValueError(
                "GeneralBatchGroupNorm examples_per_group must be a positive int or None (whole batch), "
                f"got {examples_per_group!r}."
            )
        self.channel_groups = channel_groups
        self.examples_per_group = examples_per_group
        self._init_alpha(alpha, device)
        self._register_running("moving_x", (num_features,), 0.0)
        self._register_running("moving_x2", (num_features,), 1.0)
        self.reset_parameters()

    def _channel_statistics_obstacle(self) -> str | None:
        return self._example_weighing_obstacle()

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        return NF.general_batch_group_channel_statistics(
            self.moving_x, self.moving_x2, self.channel_groups, self.moving_x.dtype
        )

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.moving_x, self.moving_x2

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        factor = self._momentum_factor()
        return NF.general_batch_group_norm(
            x,
            channel_groups=self.channel_groups,
            examples_per_group=self.examples_per_group,
            moving_x=self.moving_x,
            moving_x2=self.moving_x2,
            weight=self.weight,
            bias=self.bias,
            training=self.training,
            factor=factor,
            eps=self.eps,
            alpha=self.alpha,
            sync=self.sync_statistics,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", channel_groups={self.channel_groups}, examples_per_group={self.examples_per_group}"
        )
