"""Sequential Norm layer (SeqNorm): GN, then GhostNorm; its math is :mod:`.functional.sequential_norm`."""

from __future__ import annotations

from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm
from .ghost_norm import GHOST_DOC, GhostBatchesMixin, ghost_auto
from .group_args import AutoContext, GroupArg, divisors

#: SeqNorm's ``auto`` channel groups (the paper's best on CIFAR-100 and ImageNet), fitted to ``C``.
SEQNORM_AUTO_CHANNEL_GROUPS = 4


def _seqnorm_auto_channels(context: AutoContext) -> int:
    return SEQNORM_AUTO_CHANNEL_GROUPS


class SequentialNorm(GhostBatchesMixin, BatchStatNorm):
    """Sequential Normalization (Dimitriou & Arandjelovic, Information 2022), name ``seqnorm``.

    ``y = Ghost_{G_M}(GroupNorm_{G_C}(x))``: GN with ``channel_groups`` groups and no affine,
    then GhostNorm with ``batch_groups`` ghost batches (or ghost batches of ``ghost_batch_size``), which holds
    the per-channel affine and
    the running statistics (per channel). Eval: GN stage per example, ghost stage from the
    running statistics. Both counts have no default: the paper's best differs by data set
    (ImageNet ``G_C, G_M = 4, 4``; CIFAR-100 ``4, 8``; CIFAR-10 ``16, 8``), so give
    ``channel_groups`` and ``batch_groups`` or ``ghost_batch_size`` (docs/methods.md, "Group
    counts without a default"). Batch-size policy as in :class:`GhostNorm`.

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (
        GroupArg(
            "channel_groups",
            "channels",
            auto={"paper": _seqnorm_auto_channels},
            takes_num_groups=True,
            doc="GN-stage channel groups G_C; auto: 4 (the paper's best), fitted to C",
            required=True,
        ),
        GroupArg(
            "batch_groups",
            "batch",
            auto={"ghost16": ghost_auto},
            takes_num_groups=True,
            doc=GHOST_DOC,
            required=True,
            alternatives=("ghost_batch_size",),
        ),
    )

    def __init__(
        self,
        num_features: int,
        channel_groups: int,
        batch_groups: int | None = None,
        ghost_batch_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        if not isinstance(channel_groups, int) or channel_groups < 1 or num_features % channel_groups != 0:
            raise ValueError(
                f"SequentialNorm channel_groups={channel_groups!r} must divide the number of channels "
                f"C={num_features}; valid choices: {divisors(num_features)}."
            )
        if batch_groups is None and ghost_batch_size is None:
            raise ValueError(
                "SequentialNorm needs batch_groups (G_M ghost batches) or ghost_batch_size; it has no default "
                "(the paper's best G_M differs by data set: 4 on ImageNet, 8 on CIFAR)."
            )
        self._init_ghost(batch_groups, ghost_batch_size, "SequentialNorm")
        self.channel_groups = channel_groups
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.reset_parameters()

    @property
    def batch_groups(self) -> int | None:
        return self.num_groups

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        factor = self._momentum_factor()
        return NF.sequential_norm(
            x,
            channel_groups=self.channel_groups,
            num_ghosts=self.num_ghosts(x.shape[0]),
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
        return (
            super().extra_repr() + f", channel_groups={self.channel_groups}, batch_groups={self.num_groups}, "
            f"ghost_batch_size={self.ghost_batch_size}"
        )
