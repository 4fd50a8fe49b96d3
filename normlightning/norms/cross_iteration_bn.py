"""Cross-Iteration Batch Normalization (CBN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import BatchStatNorm, ChannelStatisticsMixin
from .functional.batch_norm import batch_norm
from .functional.cross_iteration_bn import PastStatistics, compensate, cross_iteration_statistics
from .functional.layout import NormInput
from .functional.moments import check_set_size, update_running_stats


def _conv_parameter(conv: nn.Module) -> Tensor:
    """The parameter the convolution's weight is computed from (the raw one under a parametrization)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


class CrossIterationBatchNorm(ChannelStatisticsMixin, BatchStatNorm):
    """Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang & Lin, CVPR 2021), registry name ``cbn``.

    Training: the statistics of the current batch and of the last ``window − 1`` iterations, each
    past one moved to the current weights ``W`` of the convolution before the layer by a first-order
    Taylor expansion (``normlightning.norms.functional.cross_iteration_bn``), averaged:
    ``y = gamma (x − mu_bar) / sqrt(var + eps) + beta`` (docs/methods.md, section "cbn"). Before
    ``burnin`` steps, and without a convolution, plain BN statistics. Running statistics as ``bn``
    (current batch); inference is BN with them.

    The layer needs the convolution whose output it normalizes: the ``norm:`` injection finds it
    (and refuses layers without one, naming them); by hand, :meth:`attach_convolution`. The history
    (``window − 1`` iterations of statistics, their weight derivatives and the weights) lives in
    memory, not in the ``state_dict``: after a restore it refills over ``window − 1`` steps.

    Args:
        window: ``k``, the iterations averaged (current included; 1 = BN).
        burnin: steps of plain BN statistics before the compensated window is used.
        rho: the factor of the Taylor term (1 = the paper's compensation, 0 = no compensation).

    Shape: input ``(N, C, *)``, the output of the convolution, output the same.
    """

    needs_preceding_convolution = True

    def __init__(
        self,
        num_features: int,
        window: int = 4,
        burnin: int = 0,
        rho: float = 1.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype)
        for name, value, low in (("window", window, 1), ("burnin", burnin, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"CrossIterationBatchNorm: {name} must be an int >= {low}, got {value!r}.")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)):
            raise ValueError(f"CrossIterationBatchNorm: rho must be a float, got {rho!r}.")
        self.window, self.burnin, self.rho = window, burnin, float(rho)
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.__dict__["_convolution"] = None
        self.__dict__["history"] = []
        self.reset_parameters()

    def attach_convolution(self, conv: nn.Module) -> None:
        """Use ``conv`` (whose output this layer normalizes; not registered as a submodule) for the
        compensation; its weight's first dim must be ``num_features``."""
        weight = getattr(conv, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2 or weight.shape[0] != self.num_features:
            raise ValueError(
                f"CrossIterationBatchNorm({self.num_features}) needs the convolution before it, with weight "
                f"(C={self.num_features}, ...); got {type(conv).__name__} with weight "
                f"{None if weight is None else tuple(weight.shape)}"
            )
        self.__dict__["_convolution"] = conv
        self.history.clear()

    def reset_running_stats(self) -> None:
        """``bn``'s reset, and the history of past iterations emptied."""
        super().reset_running_stats()
        self.__dict__.get("history", []).clear()

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        """The running statistics (eval is BN; ``fold_norms`` folds it)."""
        return self.running_mean, self.running_var

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return self.running_mean, self.running_var

    def compensated_history(self) -> list[tuple[Tensor, Tensor]]:
        """``(mu_j(W), meanx2_j(W))`` of every stored past iteration at the current weights."""
        weight = _conv_parameter(self._convolution)
        return [compensate(past, weight, self.rho) for past in self.history]

    def _weight_derivatives(self, mu: Tensor, meanx2: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        try:
            (dmu,) = torch.autograd.grad(mu, weight, torch.ones_like(mu), retain_graph=True)
            (dmeanx2,) = torch.autograd.grad(meanx2, weight, torch.ones_like(meanx2), retain_graph=True)
        except RuntimeError as err:
            raise RuntimeError(
                "CrossIterationBatchNorm: its input is not computed from the weight of the convolution it was "
                f"attached to ({type(self._convolution).__name__}); attach the convolution whose output it "
                f"normalizes ({err})"
            ) from err
        return dmu, dmeanx2

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        count = x.numel() // x.shape[1]
        check_set_size(count, "CrossIterationBatchNorm", "use a larger batch or input")
        factor = self._momentum_factor()
        conv = self._convolution
        if conv is None or self.window == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            # BN's statistics, and nothing to record for a compensation: the native batch norm
            return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)
        inp = NormInput(x, self.weight, self.bias)
        x3 = inp.x3
        mu = x3.mean(dim=(0, 2))
        meanx2 = x3.square().mean(dim=(0, 2))
        batch_var = (x3 - mu.view(1, -1, 1)).square().mean(dim=(0, 2))
        mean, var = mu, batch_var
        weight = _conv_parameter(conv)
        dmu, dmeanx2 = self._weight_derivatives(mu, meanx2, weight)
        if int(self.num_batches_tracked) > self.burnin and self.history:
            mean, var = cross_iteration_statistics(mu, meanx2, self.history, weight, self.rho)
        past: PastStatistics = (mu.detach(), meanx2.detach(), dmu, dmeanx2, weight.detach().clone())
        self.history.insert(0, past)
        del self.history[self.window - 1 :]
        update_running_stats(self.running_mean, self.running_var, mu.detach(), batch_var.detach(), count, factor)
        y = (x3 - mean.view(1, -1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1)
        if inp.weight is not None:
            y = y * inp.weight.view(1, -1, 1) + inp.bias.view(1, -1, 1)
        return inp.output(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}, burnin={self.burnin}, rho={self.rho}"
