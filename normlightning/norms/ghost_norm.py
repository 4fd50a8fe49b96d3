"""GhostNorm / Ghost BN layer, and the ghost-batch arguments SeqNorm shares; its math is
:mod:`.functional.ghost_norm`."""

from __future__ import annotations

from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm, ChannelStatisticsMixin, ExampleWeighingMixin
from .group_args import AutoContext, GroupArg, largest_divisor_at_most

#: ``auto`` ghost batches hold at least this many examples (Four Things §2; SeqNorm's best
#: ``G_M = 8`` at batch 128).
GHOST_AUTO_SIZE = 16


def ghost_auto_batches(batch_size: int) -> int:
    """Ghost batches ``G_M`` for a per-process batch ``B``: the largest divisor of ``B`` at or below
    ``max(1, B // 16)``, so the ghost batches are equal and hold at least 16 examples (``B < 32``: 1)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"per-process batch size must be a positive int for `auto` group counts, got {batch_size!r}")
    return largest_divisor_at_most(batch_size, max(1, batch_size // GHOST_AUTO_SIZE))


def ghost_auto(context: AutoContext) -> int:
    """The ``ghost16`` auto rule of a ghost-batch count: :func:`ghost_auto_batches` of the batch."""
    return ghost_auto_batches(context.batch_size)


#: The doc of a ghost-batch group argument (ghost, seqnorm).
GHOST_DOC = "ghost batches G_M; auto: ghost batches of >= 16 examples"


def _positive_int_or_none(value, name: str, owner: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{owner}: {name} must be a positive int or None, got {value!r}.")


class GhostBatchesMixin:
    """Resolves ``num_groups`` (G_M) / ``ghost_batch_size`` into the ghost count for a batch."""

    def _init_ghost(self, num_groups, ghost_batch_size, owner: str) -> None:
        _positive_int_or_none(num_groups, "num_groups", owner)
        _positive_int_or_none(ghost_batch_size, "ghost_batch_size", owner)
        if num_groups is not None and ghost_batch_size is not None:
            raise ValueError(f"{owner}: give either num_groups (G_M) or ghost_batch_size, not both.")
        self.num_groups = num_groups
        self.ghost_batch_size = ghost_batch_size

    def num_ghosts(self, batch_size: int) -> int:
        """Ghost batches for a batch of ``batch_size``: ``G_M``, or ``ceil(N / ghost_batch_size)``."""
        if self.num_groups is not None:
            return self.num_groups
        return max(1, -(-batch_size // self.ghost_batch_size))


class GhostNorm(ExampleWeighingMixin, GhostBatchesMixin, ChannelStatisticsMixin, BatchStatNorm):
    """GhostNorm (Dimitriou & Arandjelovic 2020) / Ghost BN (Hoffer et al. 2017), name ``ghost``.

    The batch is cut into ``G_M`` ghost batches; BN statistics per ``(ghost, c)`` over
    ``(N/G_M, S)``; per-channel affine. Ghost batch ``j`` is the samples ``n = j (mod G_M)``
    (one native call on the view ``(N/G_M, G_M*C, S)``). ``G_M = 1`` is BN.

    Args:
        num_groups: ``G_M``, the number of ghost batches, or
        ghost_batch_size: the ghost batch size ``B``: ``ceil(N/B)`` ghost batches
            (default when neither is given: ``ghost_batch_size=32``).
        alpha: inference example weighing (0 = plain inference with the running statistics).

    Batch-size policy: when ``G_M`` does not divide ``N`` (an epoch's smaller last batch) the
    ghost batches are nearly equal (the first ``N mod G_M`` hold one more example);
    ``N < G_M`` or a ghost set of one element raises ``ValueError``. Running statistics
    (per channel): mean of the ghost means, mean of the ghost unbiased variances.

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (GroupArg("num_groups", "batch", auto={"ghost16": ghost_auto}, takes_num_groups=True, doc=GHOST_DOC),)

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = None,
        ghost_batch_size: int | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        alpha: float = 0.0,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        if num_groups is None and ghost_batch_size is None:
            ghost_batch_size = 32
        self._init_ghost(num_groups, ghost_batch_size, "GhostNorm")
        self._init_alpha(alpha, device)
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.reset_parameters()

    def _channel_statistics_obstacle(self) -> str | None:
        return self._example_weighing_obstacle()

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, self.running_var

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        factor = self._momentum_factor()
        return NF.ghost_norm(
            x,
            num_ghosts=self.num_ghosts(x.shape[0]),
            running_mean=self.running_mean,
            running_var=self.running_var,
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
        return super().extra_repr() + f", num_groups={self.num_groups}, ghost_batch_size={self.ghost_batch_size}"
