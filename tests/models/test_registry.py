"""Backbone registry: our names, plugins, torchvision fallback, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from normlightning.models import (
    BUILTIN_BACKBONES,
    adapt_input_channels,
    available_backbones,
    build_backbone,
    register_backbone,
)


def test_builtin_names_listed_and_strings_point_to_same_named_functions() -> None:
    expected = {
        "small_cnn",
        "cifar_resnet18",
        "mlp",
        "wide_resnet",
        "resnet12",
        "cifar_mobilenet_v2",
        "cifar_shufflenet_v2",
        "cifar_densenet121",
    }
    assert expected <= set(available_backbones())
    for name, target in BUILTIN_BACKBONES.items():
        module, function = target.split(":")
        assert function == name and module.startswith("normlightning.models.")


def test_torchvision_fallback_builds_for_num_classes() -> None:
    model = build_backbone("resnet18", num_classes=7, input_shape=(3, 32, 32))
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_single_channel_input_adapts_first_conv() -> None:
    model = build_backbone("resnet18", num_classes=4, input_shape=(1, 32, 32))
    assert model.conv1.in_channels == 1
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    mobilenet = build_backbone("mobilenet_v2", num_classes=3, input_shape=(2, 32, 32))
    assert mobilenet.features[0][0].in_channels == 2
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        adapt_input_channels(nn.Sequential(nn.Linear(3, 3)), 1)


def test_pretrained_weights_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        build_backbone("resnet18", num_classes=10, weights="IMAGENET1K_V1")


def test_unknown_name_lists_ours_and_hints_torchvision() -> None:
    with pytest.raises(ValueError) as info:
        build_backbone("resnet_nope", num_classes=10)
    message = str(info.value)
    assert "small_cnn" in message and "cifar_resnet18" in message and "torchvision" in message


def test_register_backbone_plugin() -> None:
    def tiny(num_classes: int, input_shape: tuple[int, int, int], hidden: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))

    register_backbone("test_tiny_plugin", tiny)
    assert "test_tiny_plugin" in available_backbones()
    model = build_backbone("test_tiny_plugin", num_classes=5, input_shape=(1, 2, 2), hidden=4)
    assert model(torch.rand(3, 1, 2, 2)).shape == (3, 5)
    with pytest.raises(TypeError, match="callable"):
        register_backbone("bad", 3)


@pytest.mark.parametrize("bad", [(3, 32), (3, 0, 32), (3.0, 32, 32)])
def test_bad_input_shape(bad) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        build_backbone("small_cnn", num_classes=10, input_shape=bad)


@pytest.mark.parametrize("name", ["timm/resnet18", "resnet18", "small_cnn"])
def test_a_rejected_backbone_kwarg_is_named_with_the_backbone(name) -> None:
    """The quickstart's ``backbone_kwargs: {width: 32}`` carried over to another backbone: the error names the
    key, its value and the backbone (not a bare TypeError deep in the model's constructor)."""
    with pytest.raises(ValueError, match=rf"backbone '{name}' does not accept backbone_kwargs.bogus_width=32"):
        build_backbone(name, num_classes=3, input_shape=(3, 32, 32), bogus_width=32)


def test_a_backbone_module_named_like_a_registry_name_registers_that_name():
    """``models/<name>.py`` holds the factory registered as ``<name>`` when ``<name>`` is a registry name."""
    import normlightning.models as models

    module_files = {path.stem for path in Path(models.__file__).parent.glob("*.py")}
    misplaced = {
        name: target
        for name, target in BUILTIN_BACKBONES.items()
        if name in module_files and target != f"normlightning.models.{name}:{name}"
    }
    assert not misplaced, misplaced
