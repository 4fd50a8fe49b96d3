"""EvoNorm-B0 (batch) and EvoNorm-S0 (sample) normalization-activation layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import BatchStatNorm, NormLayer
from .functional.evonorm import evonorm_b0, evonorm_s0
from .group_args import GroupArg, divisors


def _check_spatial(layer: NormLayer, x: Tensor) -> None:
    """EvoNorm's sets are over spatial positions: refuse ``(N, C)`` inputs, naming the fix."""
    if x.dim() < 3:
        raise ValueError(
            f"{type(layer).__name__} needs input with spatial dims (N, C, L), (N, C, H, W) or (N, C, D, H, W); "
            f"got shape {tuple(x.shape)}. Its instance/group variances are over positions: use another method "
            "(e.g. bn, ln) for (N, C) features, or exclude the layer (norm.exclude)"
        )


def _init_v(layer: NormLayer, num_features: int, device, dtype) -> None:
    layer.v = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))


class EvoNormB0(BatchStatNorm):
    """EvoNorm-B0 (Liu, Brock, Simonyan & Le, NeurIPS 2020), registry name ``evonorm_b0``.

    ``y = gamma_c x / max(sqrt(var_b + eps), v_c x + sqrt(var_i + eps)) + beta_c`` with the batch
    variance ``var_b`` per channel over ``(N, S)`` (running ``running_var`` at inference) and the
    instance variance ``var_i`` per ``(n, c)`` over ``S``; ``v`` (``(C,)``, init 1) is learned.
    No mean is subtracted (docs/methods.md, section "evonorm_b0").

    Running statistics: ``running_var`` ``(C,)`` (unbiased, PyTorch momentum; ``momentum=None``:
    cumulative average). Shape: input ``(N, C, *)`` with 1 to 3 spatial dims, output the same.
    """

    #: Input ranks (``check_norm_layer``): the instance variance is over positions, so no ``(N, C)``.
    input_dims = (3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        _init_v(self, num_features, device, dtype)
        self._register_running("running_var", (num_features,), 1.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.v)

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        _check_spatial(self, x)
        factor = self._momentum_factor()
        return evonorm_b0(
            x, self.v, self.running_var, self.weight, self.bias, training=self.training, factor=factor, eps=self.eps
        )


class EvoNormS0(NormLayer):
    """EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020), registry name ``evonorm_s0``.

    ``y = gamma_c x sigmoid(v_c x) / sqrt(var_g + eps) + beta_c`` with ``var_g`` the variance of
    ``x``'s group (GN's sets: ``C/G`` channels times ``S`` positions of one example); ``v``
    (``(C,)``, init 1) is learned. No mean is subtracted, no running statistics
    (docs/methods.md, section "evonorm_s0"). ``num_groups`` must divide ``C`` (default 32, the paper's).

    Shape: input ``(N, C, *)`` with 1 to 3 spatial dims, output the same.
    """

    #: Input ranks (``check_norm_layer``): the group variance is over positions, so no ``(N, C)``.
    input_dims = (3, 4, 5)
    group_args = (GroupArg("num_groups", "channels", takes_num_groups=True, doc="channel groups G of the variance"),)

    def __init__(
        self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        valid = isinstance(num_groups, int) and not isinstance(num_groups, bool) and num_groups >= 1
        if not valid or num_features % num_groups:
            raise ValueError(
                f"EvoNormS0 num_groups={num_groups!r} must be a positive divisor of the number of channels "
                f"C={num_features}; valid choices: {divisors(num_features)}."
            )
        self.num_groups = num_groups
        _init_v(self, num_features, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.v)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        _check_spatial(self, x)
        return evonorm_s0(
            x, self.v, self.weight, self.bias, num_groups=self.num_groups, eps=self.eps, training=self.training
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"
