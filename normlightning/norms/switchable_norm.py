"""Switchable Normalization (SN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as NF
from .base import BatchStatNorm


class SwitchableNorm(BatchStatNorm):
    """Switchable Normalization (Luo, Ren, Peng, Zhang & Li, ICLR 2019), registry name ``sn``.

    Per ``(n, c)``: ``mu_in, var_in`` over ``S``; ``mu_ln = mean_c mu_in``,
    ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; ``mu_bn = mean_n mu_in``,
    ``var_bn = mean_n(var_in + mu_in^2) - mu_bn^2``.
    ``mu = sum_k softmax(mean_weight)_k mu_k``, ``var = sum_k softmax(var_weight)_k var_k``
    over ``k`` in (IN, LN, BN); ``y = gamma_c (x - mu) / sqrt(var + eps) + beta_c``.
    ``mean_weight``/``var_weight`` (shape ``(3,)``) are learnable, init equal. Running
    statistics ``running_mean``/``running_var`` (shape ``(C,)``) for the BN term only; at
    inference IN and LN terms are computed from the input.

    Shape: input ``(N, C, *)``, output the same.
    """

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
        self.mean_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(3, device=device, dtype=dtype))
        self._register_running("running_mean", (num_features,), 0.0)
        self._register_running("running_var", (num_features,), 1.0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        factor = self._momentum_factor()
        return NF.switchable_norm(
            x,
            mean_logits=self.mean_weight,
            var_logits=self.var_weight,
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
