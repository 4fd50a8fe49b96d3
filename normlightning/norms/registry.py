"""Name -> factory registry of normalization layers.

``build_norm(name, num_features, **kwargs)`` builds a layer; ``register_norm(name, factory)``
adds a plugin (a callable ``factory(num_features, **kwargs) -> nn.Module``);
``available_norms()`` lists the names.

Installed packages add methods through the entry-point group ``normlightning.norms``
(:data:`ENTRY_POINT_GROUP`): an entry point ``mynorm = my_norm.layer:MyNorm`` makes ``mynorm`` a
method of ``build_norm``, the injection and the CLI (``--norm.method mynorm``) with no wrapper
script. Discovery is lazy: the entry points are listed at the first lookup (``norm_factory``,
``build_norm``, ``available_norms``, ``register_norm``), and a plugin's module is imported the first
time its name is looked up; one that fails to import raises :class:`NormPluginError` naming the
entry point and its package (in Python, only code that looks its name up; in the CLI, every run,
whose logged hyperparameters list every registered method's arguments). An entry point whose name is a
built-in method, or that two packages both define, is refused (:class:`NormPluginError` at
discovery): a name never silently means another layer than the docs say. See docs/methods.md,
"Adding a method".
"""

from __future__ import annotations

import importlib.metadata
import inspect
from collections.abc import Callable

from torch import nn

from .batch_group_norm import BatchGroupNorm
from .batch_norm import BatchNorm, BatchRenorm
from .cross_iteration_bn import CrossIterationBatchNorm
from .evonorm import EvoNormB0, EvoNormS0
from .filter_response_norm import FilterResponseNorm
from .general_batch_group_norm import GeneralBatchGroupNorm
from .ghost_norm import GhostNorm
from .group_args import GroupArg, group_args_of
from .heterologous_norm import HeterologousNorm
from .mabn import MovingAverageBatchNorm
from .per_example import FlatGroupNorm, GroupNorm, InstanceNorm, LayerNorm, PositionalNorm
from .sequential_norm import SequentialNorm
from .switchable_norm import SwitchableNorm
from .timm_layers import PREFIX as TIMM_PREFIX
from .timm_layers import timm_norm_factory

__all__ = [
    "ENTRY_POINT_GROUP",
    "NormPluginError",
    "build_norm",
    "register_norm",
    "available_norms",
    "norm_factory",
    "norm_group_args",
]

#: The entry-point group that installed packages declare their methods in (name = ``module:factory``).
ENTRY_POINT_GROUP = "normlightning.norms"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "bn": BatchNorm,
    "gn": GroupNorm,
    "gnflat": FlatGroupNorm,
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
#: The methods that ship with normlightning (an entry point may not reuse these names).
BUILTIN_NORMS = frozenset(_REGISTRY)

#: Entry points of :data:`ENTRY_POINT_GROUP` by name, not yet imported; ``None`` until discovered.
_ENTRY_POINTS: dict[str, importlib.metadata.EntryPoint] | None = None


class NormPluginError(RuntimeError):
    """An installed plugin (entry point of :data:`ENTRY_POINT_GROUP`) cannot be used: its import
    fails, it does not give a callable, or its name clashes with a built-in or another package's."""


def _describe(entry_point: importlib.metadata.EntryPoint) -> str:
    """``'mynorm = my_norm.layer:MyNorm' of package my-norm 1.0`` (entry point and package)."""
    dist = getattr(entry_point, "dist", None)
    package = f"package {dist.name} {dist.version}" if dist is not None else "an unknown package"
    return f"entry point {entry_point.name!r} = {entry_point.value!r} (group {ENTRY_POINT_GROUP}) of {package}"


def _discovered() -> dict[str, importlib.metadata.EntryPoint]:
    """The entry points of :data:`ENTRY_POINT_GROUP` by name (listed once; nothing imported)."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        found: dict[str, importlib.metadata.EntryPoint] = {}
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name in BUILTIN_NORMS:
                raise NormPluginError(
                    f"{_describe(entry_point)} reuses the name of the built-in method {entry_point.name!r}; built-in "
                    "names cannot be replaced by a package. Rename the entry point in the package's pyproject.toml "
                    "(e.g. 'my_" + entry_point.name + "'), or uninstall the package"
                )
            other = found.get(entry_point.name)
            if other is not None and other.value != entry_point.value:
                raise NormPluginError(
                    f"{_describe(entry_point)} and {_describe(other)} claim the same method name; "
                    "uninstall one of the packages or rename one entry point"
                )
            found[entry_point.name] = entry_point
        _ENTRY_POINTS = found
    return _ENTRY_POINTS


def _load_plugin(name: str) -> Callable[..., nn.Module]:
    """Import the entry point ``name`` and register its factory (:class:`NormPluginError` when it fails)."""
    entry_point = _discovered()[name]
    try:
        factory = entry_point.load()
    except Exception as err:
        raise NormPluginError(
            f"{_describe(entry_point)} failed to import: {type(err).__name__}: {err}. Fix or reinstall that "
            "package, or uninstall it"
        ) from err
    if not callable(factory):
        raise NormPluginError(
            f"{_describe(entry_point)} gives a {type(factory).__name__}, not a layer class or factory"
        )
    _REGISTRY[name] = factory
    return factory


def available_norms() -> list[str]:
    """Sorted list of registered names: built-ins, ``register_norm`` plugins and installed entry points."""
    return sorted(set(_REGISTRY) | set(_discovered()))


def register_norm(name: str, factory: Callable[..., nn.Module], *, overwrite: bool = False) -> Callable[..., nn.Module]:
    """Register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``; returns ``factory``.

    Re-registering an existing name (an installed entry point's too) needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_norm: name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise TypeError(f"register_norm: factory for {name!r} must be callable, got {type(factory).__name__}.")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
        raise ValueError(f"register_norm: {name!r} is already registered; pass overwrite=True to replace it.")
    if name in _discovered() and name not in _REGISTRY and not overwrite:
        raise ValueError(
            f"register_norm: {name!r} is the {_describe(_discovered()[name])}; pass overwrite=True to replace it."
        )
    _REGISTRY[name] = factory
    return factory


def norm_factory(name: str) -> Callable[..., nn.Module]:
    """The class or factory registered as ``name`` (``ValueError`` listing the names when unknown);
    an installed entry point is imported at its first lookup (:class:`NormPluginError` when that fails);
    ``timm/<name>`` is timm's norm layer ``<name>`` (:mod:`normlightning.norms.timm_layers`)."""
    if isinstance(name, str) and name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
        return timm_norm_factory(name)
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        pass
    if isinstance(name, str) and name in _discovered():
        return _load_plugin(name)
    raise ValueError(
        f"Unknown normalization {name!r}; valid names: {', '.join(available_norms())}, or timm/<name> for a layer "
        f"of timm's norm registry. A plugin package declares its methods in the entry-point group "
        f"{ENTRY_POINT_GROUP!r} (docs/methods.md, 'Adding a method')."
    )


def norm_group_args(name: str) -> tuple[GroupArg, ...]:
    """The group-count arguments that the method ``name`` declares (``group_args`` of its class)."""
    return group_args_of(norm_factory(name))


def factory_accepts(factory: Callable[..., nn.Module], argument: str) -> bool:
    """Whether ``factory`` takes the keyword ``argument`` (or any keyword, ``**kwargs``; ``True`` when
    its signature cannot be read)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == argument or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def norm_accepts(name: str, argument: str) -> bool:
    """Whether the factory registered as ``name`` takes the keyword ``argument`` (:func:`factory_accepts`)."""
    return factory_accepts(norm_factory(name), argument)


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
            raise TypeError(
                f"build_norm({name!r}): {err}. See the docstring of {getattr(factory, '__name__', factory)} "
                "for its arguments."
            ) from err
        raise
