"""``check_norm_layer``: every registered method meets the contract, and a layer that breaks one
rule is rejected with a message naming that rule.

The broken layers below are each a working layer with one defect; each is rejected by the rule
that the defect breaks (the rules before it still pass, since the checks run in order)."""

from __future__ import annotations

import math

import pytest
import torch
from norm_reference import group_counts
from torch import Tensor
from torch.nn import functional as F

from normlightning.norms import BatchNorm, GroupNorm, LayerNorm, NormLayer, available_norms
from normlightning.norms.testing import NormContractError, check_norm_layer


@pytest.mark.parametrize("name", available_norms())
def test_every_registered_method_meets_the_contract(name):
    check_norm_layer(name, **group_counts(name))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("bn", {"track_running_stats": False}),  # batch statistics at inference
        ("bgn", {"num_groups": 4}),  # groups = channels: the native eval path, folded by the injection
        ("hn", {"mean": "bn", "std": "bn+en:1"}),  # a learnt mixture of two running variances
        ("ghost", {"num_groups": 4, "alpha": 0.25}),  # inference example weighing
    ],
    ids=["bn-untracked", "bgn-channels", "hn-mixture", "ghost-alpha"],
)
def test_other_settings_meet_the_contract(name, kwargs):
    check_norm_layer(name, **kwargs)


# ------------------------------------------------------------------ layers with one defect each
class IgnoresEps(GroupNorm):
    """Drops the ``eps`` it is given (the injection passes the old layer's)."""

    def __init__(self, num_features: int, num_groups: int = 2, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_groups, 1e-5, affine)


class AddsAxisToFlatInputs(LayerNorm):
    """Returns ``(N, C, 1)`` for an ``(N, C)`` input."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y.unsqueeze(-1) if x.dim() == 2 else y


class NaNInBFloat16(LayerNorm):
    """Returns NaN for bfloat16 inputs."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y * math.nan if x.dtype == torch.bfloat16 else y


class AlwaysContiguous(LayerNorm):
    """Returns a contiguous output for a channels_last input."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).contiguous()


class UnsavedShift(GroupNorm):
    """Adds a random shift kept in a buffer that is not in the ``state_dict``."""

    def __init__(self, num_features: int, num_groups: int = 2, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, num_groups, eps, affine)
        self.register_buffer("shift", torch.randn(num_features), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.shift.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)


class BatchStatisticsInEval(BatchNorm):
    """Claims running statistics but normalizes with the batch's statistics in eval."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return super().forward(x)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)


class ConstantFactor(BatchNorm):
    """Averages with a constant factor 0.5 when ``momentum=None`` (not the cumulative average)."""

    def _momentum_factor(self) -> float:
        factor = super()._momentum_factor()
        return 0.5 if self.momentum is None and factor else factor


class ResetsOnlyTheCounter(BatchNorm):
    """``reset_running_stats()`` zeroes ``num_batches_tracked`` and keeps the statistics."""

    def reset_running_stats(self) -> None:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.zero_()


class IgnoresUntracked(BatchNorm):
    """Takes ``track_running_stats`` and keeps running statistics anyway."""

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)


class DetachedInEval(LayerNorm):
    """Cuts the input out of the autograd graph in eval (an attack would see no gradient)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x if self.training else x.detach())


class WrongChannelStatistics(BatchNorm):
    """Reports twice its running variance as the statistics it normalizes with at inference."""

    def inference_channel_statistics(self) -> tuple[Tensor, Tensor]:
        return self.running_mean, 2 * self.running_var


class MeanWithoutGradient(NormLayer):
    """LayerNorm whose backward treats the mean as a constant (a wrong hand-made backward)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps, affine)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x32 = x.float() if x.dtype == torch.bfloat16 else x
        dims = tuple(range(1, x.dim()))
        mean = x32.mean(dims, keepdim=True)
        var = x32.var(dims, unbiased=False, keepdim=True)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = (x32 - mean.detach()) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@pytest.mark.parametrize(
    ("factory", "rule", "detail"),
    [
        (IgnoresEps, "declared properties", "eps=1e-3 given"),
        (AddsAxisToFlatInputs, "input shapes", r"output shape \(8, 4, 1\) for input shape \(8, 4\)"),
        (NaNInBFloat16, "dtypes", "torch.bfloat16 input .* NaN"),
        (AlwaysContiguous, "channels_last", "output not in that format"),
        (UnsavedShift, "state_dict round trip", "eval output of a layer loaded from the state_dict"),
        (BatchStatisticsInEval, "eval per example", "2 examples alone"),
        (ConstantFactor, "running statistics", "cumulative average"),
        (ResetsOnlyTheCounter, "running statistics", r"after reset_running_stats\(\)"),
        (IgnoresUntracked, "track_running_stats=False", "track_running_stats is not False"),
        (DetachedInEval, "eval gradients", "does not depend on the input"),
        (WrongChannelStatistics, "inference channel statistics", r"gamma_c \(x - mean_c\) / sqrt\(var_c \+ eps\)"),
        (MeanWithoutGradient, "gradcheck", "Jacobian mismatch"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else "",
)
def test_rejects_a_broken_layer_naming_the_rule(factory, rule, detail):
    message = f"check_norm_layer\\({factory.__name__}\\): rule '{rule}' broken: .*{detail}"
    with pytest.raises(NormContractError, match=message):
        check_norm_layer(factory)


def test_the_error_is_an_assertion_error_with_the_rule():
    with pytest.raises(AssertionError, match="rule 'dtypes'") as caught:
        check_norm_layer(NaNInBFloat16)
    assert caught.value.rule == "dtypes"
