"""Backbone registry: a name -> a ``nn.Module`` that maps images to logits.

``build_backbone(name, num_classes, input_shape=(3, H, W), **kwargs)`` resolves ``name`` in
this order:

1. names added with :func:`register_backbone` (plugins) and our built-in backbones
   (:data:`BUILTIN_BACKBONES`, imported lazily from ``"module:function"`` strings, so a
   backbone module is only imported when it is used);
2. ``timm/<architecture>`` goes to ``timm.create_model(<architecture>, num_classes=num_classes,
   in_chans=input_shape[0], pretrained=False, **kwargs)`` (the optional extra
   ``pip install "normlightning[timm]"``);
3. any other name goes to ``torchvision.models.get_model(name, num_classes=num_classes,
   weights=None, **kwargs)``: ``resnet18``, ``resnet50``, ``mobilenet_v2``,
   ``shufflenet_v2_x1_5``, ``densenet121``, ... (see ``torchvision.models.list_models()``).
   Nothing is downloaded. A torchvision model's stem expects 3 input channels; for
   ``input_shape[0] != 3`` its first convolution is rebuilt with ``input_shape[0]`` input
   channels (same kernel, stride, padding, freshly initialised), see
   :func:`adapt_input_channels`.

Pretrained weights are never built in here: they come from local files, loaded by
:func:`normlightning.models.weights.load_backbone_weights` (the task's ``backbone_weights``).

Every factory has the signature ``fn(num_classes: int, input_shape: tuple[int, int, int],
**kwargs) -> nn.Module``. Every normalization layer inside our backbones is a plain
``torch.nn.BatchNorm1d/2d`` so that the norm injection can swap it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from torch import nn

BackboneFactory = Callable[..., nn.Module]

#: Prefix of timm backbone names: ``timm/resnet18`` is timm's ``resnet18``.
TIMM_PREFIX = "timm/"

#: Our own backbones: registry name -> "module:function" (function name == registry name).
BUILTIN_BACKBONES: dict[str, str] = {
    "small_cnn": "normlightning.models.small_cnn:small_cnn",
    "cifar_resnet18": "normlightning.models.cifar_resnet18:cifar_resnet18",
    "cifar_resnet": "normlightning.models.cifar_resnet:cifar_resnet",
    "mlp": "normlightning.models.mlp:mlp",
    "wide_resnet": "normlightning.models.wide_resnet:wide_resnet",
    "resnet12": "normlightning.models.resnet12:resnet12",
    "cifar_mobilenet_v2": "normlightning.models.cifar_mobilenetv2:cifar_mobilenet_v2",
    "cifar_shufflenet_v2": "normlightning.models.cifar_shufflenetv2:cifar_shufflenet_v2",
    "cifar_densenet121": "normlightning.models.cifar_densenet:cifar_densenet121",
}

_PLUGINS: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory) -> None:
    """Add (or replace) a backbone under ``name``.

    ``factory(num_classes, input_shape, **kwargs)`` must return an ``nn.Module`` mapping
    ``(N, *input_shape)`` to logits ``(N, num_classes)``. A plugin takes precedence over a
    built-in or torchvision model of the same name.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_backbone: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_backbone: factory for {name!r} must be callable, got {type(factory).__name__}")
    _PLUGINS[name] = factory


def available_backbones() -> list[str]:
    """Sorted names of our own backbones and registered plugins (torchvision names not included)."""
    return sorted(set(BUILTIN_BACKBONES) | set(_PLUGINS))


def _resolve_builtin(name: str) -> BackboneFactory:
    module_name, function_name = BUILTIN_BACKBONES[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, function_name)


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    return shape


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``nn.Conv2d`` of ``model`` for ``in_channels`` input channels.

    The new convolution keeps out_channels, kernel size, stride, padding, dilation, bias
    and is freshly initialised (its weights are not pretrained anyway: ``weights=None``).
    Raises ``ValueError`` when the model has no ``nn.Conv2d`` (then ``input_shape[0]``
    cannot be adapted).
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return model
                if child.groups != 1:
                    raise ValueError(
                        f"cannot adapt the first convolution ({child_name}, groups={child.groups}) to "
                        f"{in_channels} input channels; use input_shape with 3 channels"
                    )
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, new)
                return model
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d to adapt to {in_channels} input channels")


def build_backbone(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    **kwargs: object,
) -> nn.Module:
    """Build the backbone ``name`` for ``num_classes`` classes and inputs of shape ``input_shape``.

    Args:
        name: one of :func:`available_backbones`, ``timm/<architecture>`` or a torchvision
            classification model name.
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input example.
        **kwargs: passed on to the factory (e.g. ``depth``/``widen_factor`` for ``wide_resnet``).

    Returns:
        ``nn.Module`` mapping ``(N, C, H, W)`` to logits ``(N, num_classes)``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    input_shape = _check_input_shape(input_shape)
    try:
        if name in _PLUGINS:
            return _PLUGINS[name](num_classes=num_classes, input_shape=input_shape, **kwargs)
        if name in BUILTIN_BACKBONES:
            return _resolve_builtin(name)(num_classes=num_classes, input_shape=input_shape, **kwargs)
        if name.startswith(TIMM_PREFIX):
            return _build_timm(name[len(TIMM_PREFIX) :], num_classes, input_shape, **kwargs)
        return _build_torchvision(name, num_classes, input_shape, **kwargs)
    except TypeError as err:
        rejected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if rejected is None or rejected.group(1) not in kwargs:
            raise
        key = rejected.group(1)
        raise ValueError(
            f"backbone {name!r} does not accept backbone_kwargs.{key}={kwargs[key]!r} ({err}). Remove it: a "
            f"config's backbone_kwargs stay when --model.backbone is changed on the command line, so pass "
            f"--model.backbone_kwargs='{{}}' (or the new backbone's own arguments) with it"
        ) from err


def _build_torchvision(name: str, num_classes: int, input_shape: tuple[int, int, int], **kwargs: object) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"unknown backbone {name!r}. Our backbones: {', '.join(available_backbones())}. "
            "Any torchvision classification model name also works, e.g. resnet18, resnet50, mobilenet_v2, "
            "shufflenet_v2_x1_5, densenet121 (full list: torchvision.models.list_models(module=torchvision.models)), "
            "and timm/<architecture> builds a timm model (e.g. timm/resnet18, timm/efficientnet_b0). "
            "Add your own with normlightning.models.register_backbone(name, factory)."
        )
    if kwargs.get("weights") is not None:
        raise ValueError(
            f"backbone_kwargs.weights={kwargs['weights']!r}: the backbone is built without weights (nothing is "
            f"downloaded); remove 'weights' and set model.backbone_weights: {kwargs['weights']!r} instead (read from "
            "the local torch hub cache, or a path to a state_dict file)"
        )
    kwargs.pop("weights", None)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if input_shape[0] != 3:
        model = adapt_input_channels(model, input_shape[0])
    return model


def _build_timm(architecture: str, num_classes: int, input_shape: tuple[int, int, int], **kwargs: object) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ImportError(
            f'backbone "{TIMM_PREFIX}{architecture}" needs timm: pip install "normlightning[timm]"'
        ) from None
    if not timm.is_model(architecture):
        raise ValueError(
            f"unknown timm architecture {architecture!r} (backbone {TIMM_PREFIX}{architecture}); list them with "
            f"timm.list_models('{architecture[:4]}*')"
        )
    set_by_task = sorted(k for k in ("num_classes", "in_chans") if k in kwargs)
    if set_by_task:
        raise ValueError(
            f"backbone_kwargs {set_by_task} are set from the task (num_classes, input_shape[0]); remove them"
        )
    if kwargs.get("pretrained") or "pretrained_cfg_overlay" in kwargs:
        raise ValueError(
            "backbone_kwargs pretrained / pretrained_cfg_overlay: timm backbones are built with pretrained=False "
            "(nothing is downloaded); set model.backbone_weights to the local weights file instead (the file that "
            "pretrained_cfg_overlay=dict(file=...) would name)"
        )
    kwargs.pop("pretrained", None)
    return timm.create_model(architecture, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)


__all__ = [
    "BUILTIN_BACKBONES",
    "BackboneFactory",
    "TIMM_PREFIX",
    "adapt_input_channels",
    "available_backbones",
    "build_backbone",
    "register_backbone",
]
