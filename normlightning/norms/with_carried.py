"""A norm layer followed by the modules the layer it replaces applied after normalizing.

timm's ``BatchNormAct2d`` computes ``act(drop(batch_norm(x)))``. Both the ``norm:`` injection
(:mod:`normlightning.injection.carry`, from an existing ``BatchNormAct2d``) and
:func:`~normlightning.norms.norm_layer` (timm's norm + activation arguments) build that structure
around one of our layers with :class:`NormWithCarried`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

__all__ = ["NormWithCarried"]


class NormWithCarried(nn.Module):
    """``y = carried_k(... carried_1(norm(x)))``: a norm layer followed by the modules the layer it
    replaced applied after normalizing (e.g. timm's ``drop`` then ``act``).

    Shape: as ``norm``. The carried modules keep their names (``self.drop``, ``self.act``).
    """

    def __init__(self, norm: nn.Module, carried: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.norm = norm
        for name, module in carried.items():
            if name == "norm":
                raise ValueError("a carried module cannot be named 'norm'")
            self.add_module(name, module)
        self.carried_names = tuple(carried)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)
        for name in self.carried_names:
            y = getattr(self, name)(y)
        return y
