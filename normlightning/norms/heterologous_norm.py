"""Heterologous Normalization (HN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as NF
from .base import BatchStatNorm, ChannelStatisticsMixin


class HeterologousNorm(ChannelStatisticsMixin, BatchStatNorm):
    """Heterologous Normalization (the HN paper; our copy is the anonymous double-blind submission), registry
    name ``hn``.

    ``x_hat = (x - mu_S) / sqrt(var_S' + eps)``, ``y = gamma_c x_hat + beta_c``: the mean
    comes from set ``S`` (``mean``) and the variance from a different set ``S'`` (``std``),
    about ``S'``'s own mean. Sets: ``bn`` (per channel over ``(N, S)``), ``in`` (per
    ``(n, c)``), ``ln`` (per ``n``), ``gn:G`` (per ``(n, g)``), ``en:G`` (per channel group
    over ``(N, C/G, S)``; ``en:1`` is the whole block, ``en:C`` equals ``bn``). ``std`` may be
    a mixture ``"bn+en:1"``, ``"bn+in+ln"``: ``var = sum_k softmax(std_weight)_k var_k``
    (parameter ``std_weight``, init equal). Default ``mean="bn", std="en:1"``; ``HN_G8`` is
    ``std="en:8"``.

    Running statistics for batch sets (PyTorch momentum, unbiased variance):
    ``running_mean`` (shape ``(C,)`` for ``bn``, ``(G,)`` for ``en:G``) when the mean set is
    a batch set; ``running_var`` (single std set) or ``running_var_<k>`` (component ``k`` of a
    mixture) of shape ``(C,)``/``(G,)`` for each batch std set. Per-example sets are computed
    from the input at inference too. Layers with any batch set have
    ``uses_batch_statistics = True``.

    Shape: input ``(N, C, *)``, output the same.
    """

    argument_attributes = {"mean": "mean_spec", "std": "std_spec"}

    def __init__(
        self,
        num_features: int,
        mean: str = "bn",
        std: str = "en:1",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, device, dtype, virtual_devices=virtual_devices)
        self.mean_spec = mean
        self.std_spec = std
        self.mean_set = NF.parse_set_spec(mean, num_features, allow_mixture=False, role="mean")[0]
        self.std_sets = NF.parse_set_spec(std, num_features, allow_mixture=True, role="std")
        sets = [self.mean_set, *self.std_sets]
        self.uses_batch_statistics = any(NF.is_batch_set(k) for k, _ in sets)
        self._batch_sets_only = all(NF.is_batch_set(k) for k, _ in sets)
        if NF.is_batch_set(self.mean_set[0]):
            self._register_running("running_mean", (self.mean_set[1],), 0.0)
        self._var_names: list[str | None] = []
        for k, (kind, g) in enumerate(self.std_sets):
            if NF.is_batch_set(kind):
                name = "running_var" if len(self.std_sets) == 1 else f"running_var_{k}"
                self._register_running(name, (g,), 1.0)
                self._var_names.append(name)
            else:
                self._var_names.append(None)
        if len(self.std_sets) > 1:
            self.std_weight = nn.Parameter(torch.zeros(len(self.std_sets), device=device, dtype=dtype))
        else:
            self.register_parameter("std_weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.std_weight is not None:
            nn.init.zeros_(self.std_weight)

    def _channel_statistics_obstacle(self) -> str | None:
        """A per-example set (``in``, ``ln``, ``gn:G``) is computed from each input."""
        if self._batch_sets_only:
            return None
        per_example = [
            spec
            for spec, (kind, _) in zip([self.mean_spec, *self.std_spec.split("+")], [self.mean_set, *self.std_sets])
            if not NF.is_batch_set(kind)
        ]
        return (
            f"HeterologousNorm(mean={self.mean_spec!r}, std={self.std_spec!r}): the set(s) {per_example} are per "
            "example, so their statistics come from each input at inference; only batch sets (bn, en:G) are "
            "constants"
        )

    def _statistics_parameters(self) -> tuple[Tensor, ...]:
        return () if self.std_weight is None else (self.std_weight,)

    def _channel_statistics(self) -> tuple[Tensor, Tensor]:
        logits = None if self.std_weight is None else self.std_weight.detach()
        running_vars = [getattr(self, name) for name in self._var_names]
        return NF.heterologous_channel_statistics(
            self.mean_set,
            self.std_sets,
            logits,
            self.running_mean,
            running_vars,
            self.num_features,
            self.running_mean.dtype,
        )

    def _channel_statistics_sources(self) -> tuple[Tensor, ...]:
        return (self.running_mean, *(getattr(self, name) for name in self._var_names))

    def forward(self, x: Tensor) -> Tensor:
        if self._splits_batch(x):
            return self._forward_per_virtual_device(x)
        self._check_input(x)
        if self._evaluates_by_channel():
            return self._inference_by_channel(x)
        running_mean = getattr(self, "running_mean", None) if NF.is_batch_set(self.mean_set[0]) else None
        running_vars = [None if n is None else getattr(self, n) for n in self._var_names]
        factor = self._momentum_factor() if self.uses_batch_statistics else 0.0
        return NF.heterologous_norm(
            x,
            mean_set=self.mean_set,
            std_sets=self.std_sets,
            std_mix_logits=self.std_weight,
            running_mean=running_mean,
            running_vars=running_vars,
            weight=self.weight,
            bias=self.bias,
            training=self.training,
            factor=factor,
            eps=self.eps,
            sync=self.sync_statistics,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mean={self.mean_spec!r}, std={self.std_spec!r}"
