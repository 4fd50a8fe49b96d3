"""Backbones: image classifiers whose normalization layers are plain ``torch.nn`` BatchNorms
(so that the norm injection can swap them), built by name through the registry
(:mod:`normlightning.models.registry`: our backbones, plugins, any torchvision model).
"""

from normlightning.models.registry import (
    BUILTIN_BACKBONES,
    BackboneFactory,
    adapt_input_channels,
    available_backbones,
    build_backbone,
    register_backbone,
)

__all__ = [
    "BUILTIN_BACKBONES",
    "BackboneFactory",
    "adapt_input_channels",
    "available_backbones",
    "build_backbone",
    "register_backbone",
]
