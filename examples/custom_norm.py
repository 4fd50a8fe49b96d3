"""Register a new normalization method and inject it by name.

The method here is an RMS layer norm for feature maps (Zhang & Sennrich 2019, applied per
example over ``(C, S)``): no mean is subtracted,

    y[n, c, s] = gamma_c * x[n, c, s] / sqrt(mean_{c', s'} x[n, c', s']^2 + eps) + beta_c

for ``x`` of shape ``(N, C, *spatial)`` (``S`` = product of spatial sizes; ``(N, C)`` works too).
It uses no batch statistics, so it behaves the same in training and inference.

``register_norm("rms", RMSLayerNorm)`` makes it a method name like the built-in ones: the
``NormInjection`` callback (the CLI's ``norm:`` section) builds it with
``build_norm("rms", num_features, eps=..., affine=...)``. Registration happens when this file is
imported, so run the CLI through it::

    python examples/custom_norm.py fit --config configs/quickstart.yaml --norm.method rms

or, from a config, ``norm: {method: rms}``.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from normlightning.norms import register_norm
from normlightning.norms.base import NormLayer

METHOD_NAME = "rms"


class RMSLayerNorm(NormLayer):
    """Per-example RMS normalization over ``(C, *spatial)`` with a per-channel affine.

    Args:
        num_features: ``C``.
        eps: added to the mean square inside the root.
        affine: learn ``weight`` (``gamma``, init 1) and ``bias`` (``beta``, init 0) of shape ``(C,)``.

    Shape: input ``(N, C, *)``, output the same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, affine, device, dtype)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        xf = x.float()
        mean_square = xf.reshape(xf.shape[0], -1).pow(2).mean(dim=1)  # (N,), float32
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        y = xf * torch.rsqrt(mean_square + self.eps).reshape(shape)
        if self.affine:
            channel = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.reshape(channel) + self.bias.reshape(channel)
        return y.to(x.dtype)


# Re-importing this file (e.g. as a module and as __main__) registers the same name again:
# allowed with overwrite=True.
register_norm(METHOD_NAME, RMSLayerNorm, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    """``normlightning`` command with the ``rms`` method registered."""
    from normlightning.cli import main as cli_main

    cli_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
