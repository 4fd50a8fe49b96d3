"""Keep what a norm layer does besides normalizing: modules it applies after the normalization.

timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` that also applies dropout and an activation
(EfficientNet, RegNet, ...): ``act(drop(batch_norm(x)))``. Replacing it by a bare norm layer
would drop the activation. :func:`carried_modules` finds such modules (the layer's children, in
registration order) and checks, on a probe input in eval mode, that the old layer is exactly its
``torch.nn`` base class's forward followed by them;
:class:`~normlightning.norms.with_carried.NormWithCarried` then runs the new norm layer followed by
the same modules. Anything else is an error naming the layer and class.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from normlightning.norms.with_carried import NormWithCarried

__all__ = ["NormWithCarried", "carried_modules", "torch_base_class"]


def torch_base_class(module: nn.Module) -> type[nn.Module]:
    """The nearest ``torch.nn`` class in ``type(module)``'s MRO (``BatchNorm2d`` for timm's
    ``BatchNormAct2d``)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn."):
            return cls
    raise TypeError(f"{type(module).__name__} does not extend a torch.nn class")


def _probe_input(module: nn.Module, num_features: int, input_shape) -> Tensor:
    if input_shape is not None:
        shape = (2, *tuple(input_shape)[1:])
    else:
        rank = {"BatchNorm1d": 2, "BatchNorm2d": 4, "BatchNorm3d": 5, "InstanceNorm1d": 3, "InstanceNorm3d": 5}
        dims = rank.get(torch_base_class(module).__name__, 4)
        shape = (2, num_features) + (5,) * (dims - 2)
    ref = next(iter(module.parameters()), None)
    ref = next(iter(module.buffers()), None) if ref is None else ref
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * 3 + 1
    return x.to(device=ref.device, dtype=ref.dtype) if ref is not None and ref.is_floating_point() else x


def carried_modules(module: nn.Module, name: str, num_features: int, input_shape=None) -> OrderedDict[str, nn.Module]:
    """The modules ``module`` applies after normalizing (empty for a ``torch.nn`` class itself).

    For a subclass of a ``torch.nn`` norm class, its child modules in registration order are the
    candidates; the subclass must compute exactly ``children(base_forward(x))`` (checked in eval
    mode on a seeded probe input of the layer's shape). Otherwise ``ValueError`` names the layer,
    its class and the fix.
    """
    base = torch_base_class(module)
    if type(module) is base:
        return OrderedDict()
    children = OrderedDict(module.named_children())
    x = _probe_input(module, num_features, input_shape)
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            expected = base.forward(module, x)
            for child in children.values():
                expected = child(expected)
            actual = module(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-5, atol=1e-6):
        extra = f" and its modules {list(children)}" if children else ""
        raise ValueError(
            f"layer {name!r} is a {type(module).__module__}.{type(module).__name__}, a subclass of "
            f"{base.__name__} whose forward is not {base.__name__}'s normalization{extra} applied in order; "
            f"the injection cannot carry that over. Exclude it (norm.exclude: ['{name}']) or remove its class "
            f"from norm.targets."
        )
    return children
