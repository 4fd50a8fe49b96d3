"""``norm_layer(name, **kwargs)``: our layers as the ``norm_layer=`` argument of torchvision and timm.

Model zoos build their normalization layers by calling ``norm_layer(num_features, **call_kwargs)``.
:func:`norm_layer` returns such a callable for any registry name::

    torchvision.models.resnet50(norm_layer=norm_layer("bgn", num_groups=64))
    timm.create_model("resnet18", norm_layer=norm_layer("gn", num_groups=32))

Keyword arguments the zoos pass at the call (they override the bound ones, as with
``functools.partial``):

- ``eps``, ``affine``, ``device``, ``dtype``: passed on to the layer;
- ``momentum``: passed on to layers with running statistics, dropped for the others (``gn``,
  ``ln``, ``in``, ``pn`` have no running average for it to weigh);
- ``track_running_stats``: ``True`` is what our batch-statistic layers do; ``False`` is passed on to
  the layers that take it (``bn``: batch statistics at inference too), refused for the other
  batch-statistic layers (they always keep running statistics) and ignored for the others;
- timm's norm + activation arguments ``act_layer``, ``act_kwargs``, ``apply_act``, ``inplace``,
  ``drop_layer``: the result is our layer followed by the dropout and the activation, the structure
  of timm's ``BatchNormAct2d`` (``drop`` then ``act``; :class:`~normlightning.norms.with_carried.NormWithCarried`,
  the same module the ``norm:`` injection builds from a ``BatchNormAct2d``). The activation is made
  by timm's ``create_act_layer``.

The returned callable is a plain function, not a ``functools.partial``: timm re-binds a partial's
keyword arguments and drops its positional ones, so ``partial(build_norm, "bgn", num_groups=64)``
loses ``"bgn"`` inside timm. See ``docs/interop.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .registry import build_norm, norm_accepts, norm_class_name, norm_factory
from .with_carried import NormWithCarried

__all__ = ["NORM_ACT_ARGS", "norm_layer"]

#: timm's norm + activation keyword arguments (see ``timm.layers.BatchNormAct2d``).
NORM_ACT_ARGS = ("act_layer", "act_kwargs", "apply_act", "inplace", "drop_layer")


def _build(name: str, num_features: int, kwargs: dict[str, Any]) -> nn.Module:
    """``build_norm`` with ``momentum`` / ``track_running_stats`` mapped as the module docstring says."""
    kwargs = dict(kwargs)
    track = kwargs.pop("track_running_stats", True)
    if not track and norm_accepts(name, "track_running_stats"):
        kwargs["track_running_stats"] = False
    if "momentum" in kwargs and not norm_accepts(name, "momentum"):
        kwargs.pop("momentum")
    layer = build_norm(name, num_features, **kwargs)
    if not track and getattr(layer, "uses_batch_statistics", False) and getattr(layer, "track_running_stats", True):
        raise ValueError(
            f"norm_layer({name!r}): track_running_stats=False is not supported; {norm_class_name(name)} always "
            "keeps running statistics (use bn, which takes it, or a method without them, e.g. gn, ln, in)"
        )
    return layer


def _activation(name: str, act_layer: Any, act_kwargs: dict[str, Any] | None, inplace: bool) -> nn.Module:
    """timm's activation for ``act_layer`` (a name, a class or ``None``), ``nn.Identity`` for none."""
    try:
        from timm.layers import create_act_layer
    except ImportError:
        raise ImportError(
            f"norm_layer({name!r}) was called with act_layer={act_layer!r}: the norm + activation structure "
            'uses timm\'s activations; pip install "normlightning[timm]"'
        ) from None
    act = create_act_layer(act_layer, inplace=inplace, **(act_kwargs or {}))
    return nn.Identity() if act is None else act


def _with_activation(name: str, layer: nn.Module, act_args: dict[str, Any]) -> nn.Module:
    """``act(drop(layer(x)))`` as timm's ``BatchNormAct2d`` computes it."""
    apply_act = act_args.get("apply_act", True)
    if apply_act and "act_layer" not in act_args:
        raise ValueError(
            f"norm_layer({name!r}) was called as a norm + activation layer ({sorted(act_args)}) without act_layer: "
            "timm passes the model's activation only to norm layers it knows by name. Register ours "
            "(normlightning.integrations.timm.register()) and pass norm_layer=" + repr(name) + ", or bind the "
            f"activation: norm_layer({name!r}, act_layer='silu')"
        )
    drop_layer = act_args.get("drop_layer")
    drop = drop_layer() if drop_layer is not None else nn.Identity()
    act = (
        _activation(name, act_args["act_layer"], act_args.get("act_kwargs"), bool(act_args.get("inplace", True)))
        if apply_act
        else nn.Identity()
    )
    return NormWithCarried(layer, {"drop": drop, "act": act})


def norm_layer(name: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """A callable ``make(num_features, **call_kwargs) -> nn.Module`` for ``norm_layer=`` arguments.

    Args:
        name: a registry name (:func:`~normlightning.norms.available_norms`), e.g. ``"bgn"``.
        **kwargs: the layer's arguments (``num_groups=64``, ``eps=1e-3``, ...) and, optionally,
            timm's norm + activation arguments (``act_layer="silu"``); see the module docstring.

    Returns:
        A plain function; ``make(C)`` builds ``build_norm(name, C, **kwargs)``, ``make(C, eps=...,
        act_layer=...)`` maps the zoos' keyword arguments as the module docstring says. Its
        ``method`` and ``kwargs`` attributes hold ``name`` and the bound arguments.

    Catch for ``bgn`` (and every ``flat`` group count): ``num_groups`` must divide ``D = C*H*W`` of
    every layer's input, which only the first forward reveals. A ``G`` that divides every layer's
    ``C`` always fits (``G = 64`` in a ResNet-50, whose layers have 64 to 2048 channels); the
    ``norm:`` injection with ``num_groups: auto`` or ``group_fit: nearest`` fits ``G`` per layer.
    """
    norm_factory(name)  # an unknown name fails here, not at the first call
    bound = dict(kwargs)

    def make(num_features: int, **call_kwargs: Any) -> nn.Module:
        merged = {**bound, **call_kwargs}
        act_args = {key: merged.pop(key) for key in NORM_ACT_ARGS if key in merged}
        layer = _build(name, num_features, merged)
        return _with_activation(name, layer, act_args) if act_args else layer

    make.__name__ = make.__qualname__ = f"{name}_norm_layer"
    make.__doc__ = f"norm_layer({name!r}, **{bound!r}): builds {norm_class_name(name)} for num_features channels."
    make.method = name
    make.kwargs = bound
    return make
