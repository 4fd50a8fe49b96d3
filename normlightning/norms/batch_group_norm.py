"""Batch Group Norm (BGN) layer; its math is :mod:`.functional.batch_group_norm`."""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm, ChannelStatisticsMixin
from .functional.fused_ops import blocks
from .functional.layout import spatial_size
from .group_args import AutoContext, GroupArg, divisors

#: The BGN paper's group count per per-GPU batch size (its Table 2 / text, ResNet-50).
BGN_PAPER_GROUPS = {128: 512, 64: 256, 32: 128, 16: 64, 8: 16, 4: 2, 2: 1}


def bgn_paper_groups(batch_size: int) -> int:
    """BGN's group count for a per-GPU batch ``B`` (the paper's mapping :data:`BGN_PAPER_GROUPS`).

    ``B`` between table entries takes the entry of the largest tabulated batch ``<= B``;
    ``B = 1`` gives 1; ``B > 128`` continues the ``G = 4 B`` trend of the upper rows
    (``4 p``, ``p`` the largest power of two ``<= B``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"per-process batch size must be a positive int for `auto` group counts, got {batch_size!r}")
    if batch_size < 2:
        return 1
    p = 1 << (batch_size.bit_length() - 1)  # largest power of two <= B
    return 4 * p if p > 128 else BGN_PAPER_GROUPS[p]


def _bgn_auto_paper(context: AutoContext) -> int:
    return bgn_paper_groups(context.batch_size)


class BatchGroupNorm(ChannelStatisticsMixin, BatchStatNorm):
    """Batch Group Normalization (Zhou, Sun, Ye, Lan, Luo, Lai, Esperança, Yang & Li, AAAI 2021), registry name ``bgn``.

    Flatten ``(C, S)`` into ``D = C*S`` (``C·H·W`` for images) and cut it into ``G``
    contiguous groups of ``D/G``; eqs. (8)-(9): ``mu_g, var_g`` (biased) over
    ``(N, D/G)``; ``y = gamma_c (x - mu_g) / sqrt(var_g + eps) + beta_c``. Running
    statistics ``running_mean``/``running_var`` per group, shape ``(G,)``, BN's policy.
    ``G`` may exceed ``C`` (groups then split a channel's positions); ``G = 1`` is the whole
    ``(N, C, S)`` block. The paper's ``G`` by per-GPU batch size: ``BGN_PAPER_GROUPS``.
    ``num_groups`` has no default: the best ``G`` depends on the batch size, and ``G = 1`` (the
    old default) was the worst setting of our MNIST study (docs/methods.md, "Group counts without
    a default").

    Spatial size: the running statistics are tied to positions of the flattened ``D``. The
    spatial size seen in training is recorded in the buffer ``trained_spatial_numel``
    (survives checkpoints). At another spatial size the layer works only if every group is a
    whole number of channels (``G`` divides ``C``); otherwise it raises ``ValueError``.
    ``G`` must divide ``D``; otherwise ``ValueError`` lists the valid choices near ``G``.

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (
        GroupArg(
            "num_groups",
            "flat",
            auto={"paper": _bgn_auto_paper},
            takes_num_groups=True,
            doc="groups of the flattened D = C*S; auto: the paper's mapping from the per-GPU batch",
            required=True,
        ),
    )

    def __init__(
        self,
        num_features: int,
        num_groups: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"BatchGroupNorm num_groups must be a positive int dividing C·H·W, got {num_groups!r}.")
        self.num_groups = num_groups
        self._register_running("running_mean", (num_groups,), 0.0)
        self._register_running("running_var", (num_groups,), 1.0)
        self.register_buffer("trained_spatial_numel", torch.tensor(0, dtype=torch.long, device=device))
        self._trained_spatial = 0
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._trained_spatial = int(self.trained_spatial_numel)

    def reset_running_stats(self) -> None:
        """Running statistics, counters and the recorded spatial size to their initial values."""
        super().reset_running_stats()
        if hasattr(self, "trained_spatial_numel"):
            self.trained_spatial_numel.zero_()
            self._trained_spatial = 0

    def _check_spatial(self, x: Tensor) -> None:
        S = spatial_size(x)
        trained = self._trained_spatial
        if trained == 0 or trained == S:
            if self.training:  # always rewrite: a buffer restore may have reset it behind the cache
                self.trained_spatial_numel.fill_(S)
                self._trained_spatial = S
            return
        if self.num_features % self.num_groups != 0:
            C = self.num_features
            raise ValueError(
                f"BatchGroupNorm with num_groups={self.num_groups} was trained at spatial size S={trained} "
                f"(D = C·H·W = {C * trained}) but got S={S} (D = {C * S}). Its groups straddle or split "
                f"channels, so its per-group running statistics are tied to positions; use the training "
                f"spatial size, or a num_groups that divides C={C} ({divisors(C)}), whose groups are whole channels."
            )

    def _channel_statistics_obstacle(self) -> str | None:
        """Groups that split channels (``num_groups`` does not divide ``C``) have statistics per position."""
        C, G = self.num_features, self.num_groups
        if C % G == 0:
            return None
        return (
            f"BatchGroupNorm num_groups={G} on C={C} channels: its groups split channels, so its statistics "
            f"differ between positions of one channel; only whole-channel groups ({divisors(C)}) have them "
            "per channel"
        )

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        per_group = self.num_features // self.num_groups
        return blocks(self.running_mean, per_group), blocks(self.running_var, per_group)

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        self._check_spatial(x)
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        factor = self._momentum_factor()
        return NF.batch_group_norm(
            x,
            num_groups=self.num_groups,
            running_mean=self.running_mean,
            running_var=self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=self.training,
            factor=factor,
            eps=self.eps,
            sync=self.sync_statistics,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"
