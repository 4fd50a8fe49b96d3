"""``timm/<name>``: any layer of timm's norm registries as a normalization method.

``norm.method: timm/evonorms0`` (or ``build_norm("timm/frn", C)``) builds the layer that timm's
``get_norm_layer(<name>)`` (plain norm layers: ``groupnorm``, ``layernorm2d``, ``rmsnorm2d``, ...)
or, for names only there, ``get_norm_act_layer(<name>, act_layer=None)`` (norm + activation
layers: ``evonormb0``, ``evonorms0``, ``frn``, ``frntlu``, ...) returns, with the given keyword
arguments. ``act_layer=None`` asks timm's norm + activation layers that take an ``act_layer`` for
no activation of their own: the model keeps its activation after the layer.

Arguments are checked against the timm class's signature, because timm's layers swallow unknown
keyword arguments (``**_``): an argument the class does not name is refused, except
``affine=True`` (what the injection passes from every replaced layer; timm's layers are affine),
so nothing given is silently dropped. The built layer gets an ``effective_args()`` method (every
named constructor argument as the layer keeps it, or as given or defaulted when the layer keeps no
attribute of that name), which the injection summary and the logged hyperparameters read.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["PREFIX", "TimmNormFactory", "timm_norm_factory"]

PREFIX = "timm/"
_SKIPPED = ("self", "device", "dtype")


def _timm_class(name: str) -> tuple[Any, dict[str, Any]]:
    """The class timm registers as ``name`` and the arguments timm binds to it."""
    try:
        from timm.layers import create_norm, create_norm_act
    except ImportError:
        raise ImportError(
            f"norm method {PREFIX}{name!r} builds a layer of timm's norm registry and needs timm: "
            'pip install "normlightning[timm]"'
        ) from None
    key = name.replace("_", "").lower()
    if key in create_norm._NORM_MAP:
        entry = create_norm.get_norm_layer(key)
    elif key in create_norm_act._NORM_ACT_MAP:
        entry = create_norm_act.get_norm_act_layer(key, act_layer=None)
    else:
        known = sorted(set(create_norm._NORM_MAP) | set(create_norm_act._NORM_ACT_MAP))
        raise ValueError(f"timm has no norm layer named {name!r}; valid {PREFIX}<name>: {', '.join(known)}")
    if isinstance(entry, functools.partial):
        return entry.func, dict(entry.keywords)
    return entry, {}


def _named_parameters(cls: Any) -> dict[str, inspect.Parameter]:
    """The constructor arguments ``cls`` names (not ``self``, ``device``, ``dtype``, ``*args``, ``**kwargs``)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    signature = inspect.signature(cls.__init__ if isinstance(cls, type) else cls)
    return {n: p for n, p in signature.parameters.items() if n not in _SKIPPED and p.kind not in variadic}


class TimmNormFactory:
    """``factory(num_features, **kwargs)``: timm's norm layer ``<name>`` (see the module docstring).

    Attributes:
        method: ``"timm/<name>"``; ``__name__``: the timm class's name (the summary shows it).
    """

    group_args = ()

    def __init__(self, name: str) -> None:
        self.method = PREFIX + name
        self.cls, self.bound = _timm_class(name)
        self.parameters = _named_parameters(self.cls)
        self.__name__ = getattr(self.cls, "__name__", type(self.cls).__name__)
        num_features, *others = self.parameters.values()
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in others]
        self.__signature__ = inspect.Signature([num_features.replace(annotation=int), *keyword])

    def __call__(self, num_features: int, **kwargs: Any) -> nn.Module:
        if kwargs.get("affine", True) is True:
            kwargs.pop("affine", None)
        unknown = sorted(set(kwargs) - set(self.parameters) - {"device", "dtype"})
        if unknown:
            raise ValueError(
                f"{self.method} ({self.__name__}) takes no argument(s) {unknown}; its arguments: "
                f"{', '.join(list(self.parameters)[1:])}"
                + (" (timm's layers are always affine: affine=False cannot be honoured)" if "affine" in unknown else "")
            )
        given = {**self.bound, **kwargs}
        layer = self.cls(num_features, **given)
        values = {}
        for index, (name, parameter) in enumerate(self.parameters.items()):
            if index == 0:
                continue  # num_features
            if name in given:
                values[name] = getattr(layer, name, given[name])
            else:
                values[name] = getattr(layer, name, parameter.default)
        values = {"num_features": num_features, **values}
        layer.effective_args = functools.partial(dict, values)
        return layer


def timm_norm_factory(method: str) -> TimmNormFactory:
    """The factory of ``method`` = ``"timm/<name>"`` (``ImportError`` naming the extra without timm,
    ``ValueError`` listing timm's names for an unknown one)."""
    return TimmNormFactory(method[len(PREFIX) :])
