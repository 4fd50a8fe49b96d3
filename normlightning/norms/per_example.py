"""Per-example normalizations (no batch axis in the set): GN, LN, IN, PN.

They compute their statistics from the input in training and at inference alike, so they
have no running statistics.
"""

from __future__ import annotations

from torch import Tensor

from . import functional as NF
from .base import NormLayer
from .group_args import GroupArg, divisors


class GroupNorm(NormLayer):
    """Group Normalization (Wu & He, ECCV 2018), registry name ``gn``.

    Per ``(n, g)`` over ``(C/G, S)``: ``y = gamma_c (x - mu_ng) / sqrt(var_ng + eps) + beta_c``.
    ``num_groups`` must divide ``C`` (default 32, the paper's choice).

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (GroupArg("num_groups", "channels", takes_num_groups=True, doc="channel groups G"),)

    def __init__(
        self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if not isinstance(num_groups, int) or num_groups < 1 or num_features % num_groups != 0:
            raise ValueError(
                f"GroupNorm num_groups={num_groups!r} must be a positive divisor of the number of "
                f"channels C={num_features}; valid choices: {divisors(num_features)}."
            )
        self.num_groups = num_groups
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.group_norm(
            x, num_groups=self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps, training=self.training
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"


class FlatGroupNorm(NormLayer):
    """Group Norm over each example's flattened ``D = C*S`` (docs/methods.md, section gnflat), registry
    name ``gnflat``: the reading of the BGN paper's "G = 128 is used in GN" on WideResNet-10-2 (16-128
    channels), where G "will divide images into patches".

    ``D`` (channel-major) is cut into ``G`` contiguous groups of ``D/G``; per ``(n, g)``:
    ``y = gamma_c (x - mu_ng) / sqrt(var_ng + eps) + beta_c``. ``G`` dividing ``C`` is :class:`GroupNorm`;
    ``G > C`` cuts each channel into ``G/C`` bands of rows (patches); ``G = C`` is IN. BGN's sets without
    the batch axis. ``G`` must divide ``D`` (checked in ``forward``: ``D`` depends on the input size).

    Shape: input ``(N, C, *)``, output the same.
    """

    group_args = (
        GroupArg("num_groups", "flat", takes_num_groups=True, required=True, doc="groups of the flattened D = C*S"),
    )

    def __init__(
        self, num_features: int, num_groups: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"FlatGroupNorm num_groups={num_groups!r} must be a positive int (a divisor of D = C*S).")
        self.num_groups = num_groups
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.flat_group_norm(
            x, num_groups=self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps, training=self.training
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"


class LayerNorm(NormLayer):
    """Layer Normalization for feature maps (Ba et al. 2016), registry name ``ln``.

    Per example ``n`` over ``(C, S)``, per-channel affine ``gamma_c, beta_c``
    (as in GN with one group; *not* ``nn.LayerNorm``'s elementwise affine).

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.layer_norm(x, weight=self.weight, bias=self.bias, eps=self.eps, training=self.training)


class InstanceNorm(NormLayer):
    """Instance Normalization (Ulyanov et al. 2016), registry name ``in``.

    Per ``(n, c)`` over ``S``, per-channel affine; statistics from the input in eval too
    (like ``nn.InstanceNorm2d(track_running_stats=False)``). Needs ``S > 1`` in training.

    Shape: input ``(N, C, *)`` with 1 to 3 spatial dims (``input_dims``: an ``(N, C)`` input has one
    element per set), output the same.
    """

    input_dims = (3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps, training=self.training)


class PositionalNorm(NormLayer):
    """Positional Normalization (Li et al., NeurIPS 2019), registry name ``pn``.

    Per position ``(n, s)`` over the channels ``C``: ``y = gamma_c (x - mu_ns) / sqrt(var_ns + eps) + beta_c``.
    Needs ``C > 1`` in training.

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return NF.positional_norm(x, weight=self.weight, bias=self.bias, eps=self.eps, training=self.training)
