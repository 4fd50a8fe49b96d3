"""Our normalization methods in timm's norm-layer registry, so ``norm_layer="gn"`` works in timm.

::

    import timm
    from normlightning.integrations import timm as nl_timm

    nl_timm.register()                                   # every name of available_norms() (timm_name_for)
    nl_timm.register_as("gn8", "gn", num_groups=8)       # a name with bound arguments
    nl_timm.register_as("bgn64", "bgn", num_groups=64)   # bgn and seqnorm have no default group count
    timm.create_model("resnet18", norm_layer="bgn64")
    timm.create_model("efficientnet_b0", norm_layer="gn8")  # keeps the model's activation

timm resolves a string ``norm_layer`` in one of two tables: plain norm layers
(``get_norm_layer``; ResNet) and norm + activation layers (``get_norm_act_layer``; EfficientNet,
RegNet, ...). The second passes the model's ``act_layer`` only to the entries of its set of
layers that take one. :func:`register_as` puts a :func:`~normlightning.norms.norm_layer`
callable into both tables and that set, so a norm + activation layer becomes our layer followed
by timm's dropout and activation (see :mod:`normlightning.norms.zoo_factory`). Names are looked
up lowercased without ``_``, so a registered name is lowercase letters and digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from normlightning.norms import available_norms, norm_layer

__all__ = ["register", "register_as", "timm_name_for"]


def _timm_tables() -> tuple[dict, dict, set]:
    """timm's plain-norm table, norm + activation table, and the set of entries given ``act_layer``."""
    try:
        from timm.layers import create_norm, create_norm_act
    except ImportError:
        raise ImportError('normlightning.integrations.timm needs timm: pip install "normlightning[timm]"') from None
    return create_norm._NORM_MAP, create_norm_act._NORM_ACT_MAP, create_norm_act._NORM_ACT_REQUIRES_ARG


def _is_ours(entry: Any) -> bool:
    return getattr(entry, "__module__", None) == norm_layer.__module__ and hasattr(entry, "method")


def register_as(timm_name: str, method: str, *, overwrite: bool = False, **kwargs: Any) -> None:
    """Make ``norm_layer=timm_name`` in timm build ``norm_layer(method, **kwargs)``.

    Args:
        timm_name: the name models are given (lowercase letters and digits).
        method: our registry name.
        overwrite: replace an entry of timm's own of the same name (ours are always replaced).
        **kwargs: the layer's bound arguments (``num_groups=64``).
    """
    if not isinstance(timm_name, str) or not re.fullmatch(r"[a-z0-9]+", timm_name):
        raise ValueError(
            f"timm norm-layer name {timm_name!r} must be lowercase letters and digits (timm lowercases names and "
            "drops '_' before the lookup)"
        )
    norm_map, norm_act_map, takes_act = _timm_tables()
    taken = [table[timm_name] for table in (norm_map, norm_act_map) if timm_name in table]
    if not overwrite and any(not _is_ours(entry) for entry in taken):
        raise ValueError(
            f"timm already has a norm layer named {timm_name!r} ({taken[0]!r}); register ours under another name "
            f"(register_as('nl{timm_name}', {method!r})) or pass overwrite=True"
        )
    for entry in taken:
        if _is_ours(entry):
            takes_act.discard(entry)
    factory = norm_layer(method, **kwargs)
    norm_map[timm_name] = factory
    norm_act_map[timm_name] = factory
    takes_act.add(factory)


def timm_name_for(method: str) -> str:
    """The name :func:`register` gives ``method`` in timm: ``method`` without ``_`` (timm drops it
    before the lookup), prefixed ``nl`` when timm has a layer of its own under that name
    (``frn`` -> ``nlfrn``, ``evonorm_b0`` -> ``evonormb0`` is timm's -> ``nlevonormb0``)."""
    name = method.replace("_", "").lower()
    norm_map, norm_act_map, _ = _timm_tables()
    taken = [table[name] for table in (norm_map, norm_act_map) if name in table]
    return "nl" + name if any(not _is_ours(entry) for entry in taken) else name


def register(methods: Iterable[str] | None = None, *, overwrite: bool = False) -> list[str]:
    """Register each of ``methods`` (default: every name of
    :func:`~normlightning.norms.available_norms`, plugins included) in timm; returns the timm names.

    With ``overwrite=False`` a method is registered under :func:`timm_name_for` (its own name
    unless timm has a layer of that name); with ``overwrite=True`` under its own name without
    ``_``, replacing timm's entry.
    """
    names = list(methods) if methods is not None else available_norms()
    registered = []
    for name in names:
        timm_name = name.replace("_", "").lower() if overwrite else timm_name_for(name)
        register_as(timm_name, name, overwrite=overwrite)
        registered.append(timm_name)
    return registered
