"""Name -> factory registry of normalization layers.

``build_norm(name, num_features, **kwargs)`` builds a layer; ``register_norm(name, factory)``
adds a plugin (a callable ``factory(num_features, **kwargs) -> nn.Module``);
``available_norms()`` lists the names.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .batch_group_norm import BatchGroupNorm, GeneralBatchGroupNorm
from .batch_norm import BatchNorm, BatchRenorm
from .cross_iteration_bn import CrossIterationBatchNorm
from .evonorm import EvoNormB0, EvoNormS0
from .filter_response_norm import FilterResponseNorm
from .mabn import MovingAverageBatchNorm
from .ghost_norm import GhostNorm, SequentialNorm
from .group_args import GroupArg, group_args_of
from .heterologous_norm import HeterologousNorm
from .per_example import GroupNorm, InstanceNorm, LayerNorm, PositionalNorm
from .switchable_norm import SwitchableNorm
from .timm_layers import PREFIX as TIMM_PREFIX, timm_norm_factory

__all__ = ["build_norm", "register_norm", "available_norms", "norm_factory", "norm_group_args"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "bn": BatchNorm,
    "gn": GroupNorm,
    "ln": LayerNorm,
    "in": InstanceNorm,
    "pn": PositionalNorm,
    "ghost": GhostNorm,
    "seqnorm": SequentialNorm,
    "bgn": BatchGroupNorm,
    "gbgn": GeneralBatchGroupNorm,
    "hn": HeterologousNorm,
    "sn": SwitchableNorm,
    "brn": BatchRenorm,
    "frn": FilterResponseNorm,
    "evonorm_b0": EvoNormB0,
    "evonorm_s0": EvoNormS0,
    "mabn": MovingAverageBatchNorm,
    "cbn": CrossIterationBatchNorm,
}


def available_norms() -> list[str]:
    """Sorted list of registered names."""
    return sorted(_REGISTRY)


def register_norm(name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False) -> Callable[..., nn.Module]:
    """Register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``; returns ``factory``.

    Re-registering an existing name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_norm: name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"register_norm: factory for {name!r} must be callable, got {type(factory).__name__}.")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"register_norm: {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[name] = factory
    return factory


def norm_factory(name: str) -> Callable[..., nn.Module]:
    """The class or factory registered as ``name`` (``ValueError`` listing the names when unknown);
    ``timm/<name>`` is timm's norm layer ``<name>`` (:mod:`normlightning.norms.timm_layers`)."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
        return timm_norm_factory(name)
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown normalization {name!r}; valid names: {', '.join(available_norms())}, or timm/<name> for a "
            "layer of timm's norm registry."
        ) from None


def norm_group_args(name: str) -> tuple[GroupArg, ...]:
    """The group-count arguments that the method ``name`` declares (``group_args`` of its class)."""
    return group_args_of(norm_factory(name))


def norm_accepts(name: str, argument: str) -> bool:
    """Whether the factory registered as ``name`` takes the keyword ``argument`` (or any keyword,
    ``**kwargs``; ``True`` when its signature cannot be read)."""
    try:
        parameters = inspect.signature(norm_factory(name)).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def norm_class_name(name: str) -> str:
    """The class (or factory) name behind the registry name ``name``, e.g. ``"BatchGroupNorm"``."""
    factory = norm_factory(name)
    return getattr(factory, "__name__", type(factory).__name__)


def build_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """Build the normalization layer registered as ``name`` for ``num_features`` channels."""
    factory = norm_factory(name)
    try:
        return factory(num_features, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err) or "missing 1 required" in str(err):
            raise TypeError(f"build_norm({name!r}): {err}. See the docstring of {getattr(factory, '__name__', factory)} for its arguments.") from err
        raise
