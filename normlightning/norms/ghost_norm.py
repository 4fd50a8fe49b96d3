"""GhostNorm / Ghost BN and Sequential Norm layers."""

from __future__ import annotations

from torch import Tensor

from . import functional as NF
from .base import BatchStatNorm, ExampleWeighingMixin
from .group_args import AutoContext, GroupArg, divisors, largest_divisor_at_most

#: ``auto`` ghost batches hold at least this many examples (Four Things §2; SeqNorm's best
#: ``G_M = 8`` at batch 128).
GHOST_AUTO_SIZE = 16
#: SeqNorm's ``auto`` channel groups (the paper's best on CIFAR-100 and ImageNet), fitted to ``C``.
SEQNORM_AUTO_CHANNEL_GROUPS = 4


def ghost_auto_batches(batch_size: int) -> int:
    """Ghost batches ``G_M`` for a per-process batch ``B``: the largest divisor of ``B`` at or below
    ``max(1, B // 16)``, so the ghost batches are equal and hold at least 16 examples (``B < 32``: 1)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"per-process batch size must be a positive int for `auto` group counts, got {batch_size!r}")
    return largest_divisor_at_most(batch_size, max(1, batch_size // GHOST_AUTO_SIZE))


def _ghost_auto(context: AutoContext) -> int:
    return ghost_auto_batches(context.batch_size)


def _seqnorm_auto_channels(context: AutoContext) -> int:
    return SEQNORM_AUTO_CHANNEL_GROUPS


_GHOST_DOC = "ghost batches G_M; auto: ghost batches of >= 16 examples"


def _positive_int_or_none(value, name: str, owner: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{owner}: {name} must be a positive int or None, got {value!r}.")


class _GhostMixin:
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


class GhostNorm(ExampleWeighingMixin, _GhostMixin, BatchStatNorm):
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

    group_args = (
        GroupArg("num_groups", "batch", auto={"ghost16": _ghost_auto}, takes_num_groups=True, doc=_GHOST_DOC),
    )

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

    def inference_channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The mean and variance per channel ``(C,)`` this layer normalizes with at inference
        (``y = gamma (x - mean) / sqrt(var + eps) + beta``); ``ValueError`` when ``alpha > 0``."""
        self._check_no_example_weighing()
        return self.running_mean, self.running_var

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
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


class SequentialNorm(_GhostMixin, BatchStatNorm):
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
            auto={"ghost16": _ghost_auto},
            takes_num_groups=True,
            doc=_GHOST_DOC,
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
