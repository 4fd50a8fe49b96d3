"""Filter Response Normalization with a thresholded linear unit (FRN + TLU)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import NormLayer
from .functional.filter_response_norm import filter_response_norm


class FilterResponseNorm(NormLayer):
    """Filter Response Normalization + TLU (Singh & Krishnan, CVPR 2020), registry name ``frn``.

    Per ``(n, c)`` over the spatial positions ``S``: ``nu2 = mean_s x²``,
    ``y = gamma_c x / sqrt(nu2 + eps_eff) + beta_c``, then the TLU ``z = max(y, tau_c)``
    (docs/methods.md, section "frn"). No mean is subtracted and no statistic crosses examples or
    channels; no running statistics.

    Args:
        num_features: ``C``.
        eps: the constant ``eps`` (default 1e-6, the paper's); with ``learnable_eps`` the lower bound
            of ``eps_eff = eps + |eps_learned|``.
        affine: learn ``gamma``/``beta`` (``weight``/``bias``).
        tlu: apply the TLU with a learned per-channel ``tau`` (init 0). The TLU replaces the
            activation that follows FRN in the paper; the ``norm:`` injection keeps the model's own
            activation after the layer unless ``norm.remove_following_activation`` is set
            (docs/methods.md, section "frn", "The activation after it").
        learnable_eps: learn the scalar ``eps_learned`` (init ``learnable_eps_init``), the paper's
            remedy for maps of one position (``S = 1``, e.g. ``(N, C)`` inputs).
        learnable_eps_init: the initial ``eps_learned``.

    Shape: input ``(N, C)`` to ``(N, C, D, H, W)``, output the same.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        affine: bool = True,
        tlu: bool = True,
        learnable_eps: bool = False,
        learnable_eps_init: float = 1e-4,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        for name, value in (("tlu", tlu), ("learnable_eps", learnable_eps)):
            if not isinstance(value, bool):
                raise ValueError(f"FilterResponseNorm: {name} must be True or False, got {value!r}.")
        init = learnable_eps_init
        if isinstance(init, bool) or not isinstance(init, (int, float)) or init < 0:
            raise ValueError(f"FilterResponseNorm: learnable_eps_init must be a float >= 0, got {init!r}.")
        self.tlu = tlu
        self.learnable_eps = learnable_eps
        self.learnable_eps_init = float(learnable_eps_init)
        factory = {"device": device, "dtype": dtype}
        self.tau = nn.Parameter(torch.empty(num_features, **factory)) if tlu else None
        self.eps_learned = nn.Parameter(torch.empty((), **factory)) if learnable_eps else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Affine to identity, ``tau = 0``, ``eps_learned = learnable_eps_init``."""
        super().reset_parameters()
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.eps_learned is not None:
            nn.init.constant_(self.eps_learned, self.learnable_eps_init)

    def effective_eps(self) -> float | Tensor:
        """``eps``, or ``eps + |eps_learned|`` (a 0-d tensor) with ``learnable_eps``."""
        return self.eps if self.eps_learned is None else self.eps + self.eps_learned.abs()

    @property
    def replaces_following_activation(self) -> bool:
        """With the TLU the layer applies its own activation (``norm.remove_following_activation``)."""
        return self.tlu

    @property
    def injection_note(self) -> str | None:
        """The injection summary's note on this layer: its TLU and the model's activation after it."""
        if not self.tlu:
            return None
        return "TLU max(y, tau) inside; the model's activation after the layer is kept (a ReLU makes it max(y, tau, 0))"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return filter_response_norm(x, self.weight, self.bias, self.tau, self.effective_eps())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tlu={self.tlu}, learnable_eps={self.learnable_eps}"
