"""Parameter normalizations for conv and linear layers: weight standardization, weight norm and
weight centering.

Both are applied in place to existing ``nn.Conv1d/2d/3d`` / ``nn.Linear`` modules through
``torch.nn.utils.parametrize``, so ``module.weight`` stays the name other code reads (the
raw parameter lives in ``module.parametrizations.weight.original``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from . import functional as NF
from .functional.mabn import weight_center

__all__ = [
    "WeightCentering",
    "WeightStandardization",
    "WSConv2d",
    "apply_weight_centering",
    "apply_weight_norm",
    "apply_weight_standardization",
]

_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class WeightStandardization(nn.Module):
    """Parametrization ``w -> (w - mean(w[o])) / sqrt(var(w[o]) + eps)`` per output unit ``o``
    over ``(in, *kernel)`` (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel
    Normalization and Weight Standardization"); biased variance, ``eps`` inside the root.
    """

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, weight: Tensor) -> Tensor:
        return NF.weight_standardize(weight, eps=self.eps)


class WeightCentering(nn.Module):
    """Parametrization ``w -> w - mean(w[o])`` per output unit ``o`` over ``(in, *kernel)``: the
    centred convolutions of MABN (Yan et al., ICLR 2020; the official ``CenConv2d``)."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight_center(weight)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is standardized per output channel at every forward.

    Same arguments as ``nn.Conv2d`` plus ``ws_eps``. Shape: ``(N, C_in, H, W) -> (N, C_out, H', W')``.
    """

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, NF.weight_standardize(self.weight, eps=self.ws_eps), self.bias)


def _check_module(module: nn.Module, what: str) -> None:
    if not isinstance(module, _SUPPORTED):
        raise TypeError(f"{what} applies to nn.Conv1d/2d/3d or nn.Linear, got {type(module).__name__}.")


def _has_parametrization(module: nn.Module, kind: type) -> bool:
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(p, kind) for p in module.parametrizations.weight)


def apply_weight_standardization(module: nn.Module, eps: float = 1e-5) -> nn.Module:
    """Standardize ``module.weight`` per output unit, in place (idempotent); returns ``module``."""
    _check_module(module, "apply_weight_standardization")
    if not _has_parametrization(module, WeightStandardization):
        parametrize.register_parametrization(module, "weight", WeightStandardization(eps))
    return module


def apply_weight_centering(module: nn.Module) -> nn.Module:
    """Centre ``module.weight`` per output unit, in place (idempotent); returns ``module``."""
    _check_module(module, "apply_weight_centering")
    if not _has_parametrization(module, WeightCentering):
        parametrize.register_parametrization(module, "weight", WeightCentering())
    return module


def apply_weight_norm(module: nn.Module, dim: int = 0) -> nn.Module:
    """Weight normalization ``w = g v / ||v||`` per output unit (Salimans & Kingma 2016), in place
    via ``torch.nn.utils.parametrizations.weight_norm`` (idempotent); returns ``module``."""
    _check_module(module, "apply_weight_norm")
    if parametrize.is_parametrized(module, "weight") and any(
        type(p).__name__ == "_WeightNorm" for p in module.parametrizations.weight
    ):
        return module
    return weight_norm(module, name="weight", dim=dim)
