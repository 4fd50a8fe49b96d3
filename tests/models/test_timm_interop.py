"""timm: backbones by name (``timm/<architecture>``) and our names in timm's norm-layer registry."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from torch import nn

from normlightning.integrations import timm as nl_timm
from normlightning.models import build_backbone
from normlightning.norms import BatchGroupNorm, BatchNorm, GroupNorm, NormWithCarried, available_norms


@pytest.fixture
def timm_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of timm's norm-layer tables for the test, so registrations do not outlive it."""
    from timm.layers import create_norm, create_norm_act

    monkeypatch.setattr(create_norm, "_NORM_MAP", dict(create_norm._NORM_MAP))
    monkeypatch.setattr(create_norm_act, "_NORM_ACT_MAP", dict(create_norm_act._NORM_ACT_MAP))
    monkeypatch.setattr(create_norm_act, "_NORM_ACT_REQUIRES_ARG", set(create_norm_act._NORM_ACT_REQUIRES_ARG))


@pytest.fixture
def without_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import timm`` fails as when the extra is not installed."""
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------ backbones by name
def test_timm_backbone_by_name_gets_num_classes_and_in_chans() -> None:
    model = build_backbone("timm/resnet18", num_classes=7, input_shape=(1, 32, 32))
    assert isinstance(model, timm.models.ResNet) and model.conv1.in_channels == 1
    assert model.get_classifier().out_features == 7
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    tiny = build_backbone("timm/resnet18", num_classes=3, input_shape=(3, 32, 32), drop_rate=0.5)
    assert tiny.drop_rate == 0.5  # backbone_kwargs reach timm.create_model


def test_timm_backbone_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet_nope'.*timm.list_models"):
        build_backbone("timm/resnet_nope", num_classes=3)
    with pytest.raises(ValueError, match="backbone_weights"):
        build_backbone("timm/resnet18", num_classes=3, pretrained=True)
    with pytest.raises(ValueError, match="backbone_weights"):
        build_backbone("timm/resnet18", num_classes=3, pretrained_cfg_overlay={"file": "x.pth"})
    with pytest.raises(ValueError, match=r"\['in_chans'\] are set from the task"):
        build_backbone("timm/resnet18", 3, (3, 32, 32), in_chans=1)


def test_timm_backbone_without_timm_says_how_to_install(without_timm) -> None:
    with pytest.raises(ImportError, match=r'pip install "normlightning\[timm\]"'):
        build_backbone("timm/resnet18", num_classes=3)


# ------------------------------------------------------------------ timm's registry
def test_register_makes_our_names_timm_norm_layers(timm_tables) -> None:
    """``norm_layer="gn"`` in a timm ResNet: our GroupNorm, which computes what timm's own
    ``groupnorm`` (GroupNorm with 32 groups) computes on the same weights."""
    expected = [name.replace("_", "") for name in available_norms()]
    expected = [f"nl{n}" if n in ("frn", "evonormb0", "evonorms0") else n for n in expected]  # timm's own names
    assert nl_timm.register() == expected
    torch.manual_seed(0)
    ours = timm.create_model("resnet18", num_classes=5, norm_layer="gn")
    native = timm.create_model("resnet18", num_classes=5, norm_layer="groupnorm")
    with torch.no_grad():
        for m in native.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    ours.load_state_dict(native.state_dict())
    layers = [m for m in ours.modules() if isinstance(m, GroupNorm)]
    assert len(layers) == 20 and {m.num_groups for m in layers} == {32}
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), native(x), rtol=1e-4, atol=1e-5)


def test_register_as_binds_arguments(timm_tables) -> None:
    nl_timm.register_as("bgn16", "bgn", num_groups=16)
    model = timm.create_model("resnet18", num_classes=5, norm_layer="bgn16")
    layers = [m for m in model.modules() if isinstance(m, BatchGroupNorm)]
    assert len(layers) == 20 and {m.num_groups for m in layers} == {16}
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 5)


def test_registered_name_in_a_norm_act_model_keeps_each_activation(timm_tables) -> None:
    """EfficientNet builds norm + activation layers: with ``norm_layer="bn"`` each is our BatchNorm
    followed by the model's own activation, and the network computes what timm's BatchNormAct2d
    version computes on the same weights (eval mode, random running statistics)."""
    nl_timm.register(["bn"])
    torch.manual_seed(0)
    native = timm.create_model("efficientnet_b0", num_classes=3)
    ours = timm.create_model("efficientnet_b0", num_classes=3, norm_layer="bn")
    native_layers = {n: m for n, m in native.named_modules() if isinstance(m, timm.layers.BatchNormAct2d)}
    assert native_layers and any(isinstance(m.act, nn.SiLU) for m in native_layers.values())
    state = {}
    g = torch.Generator().manual_seed(1)
    for key, value in native.state_dict().items():
        module_name, _, tensor = key.rpartition(".")
        if module_name in native_layers:
            if tensor in ("running_mean", "weight", "bias"):
                value = value + 0.1 * torch.randn(value.shape, generator=g)
            elif tensor == "running_var":
                value = value + torch.rand(value.shape, generator=g)
            key = f"{module_name}.norm.{tensor}"
        state[key] = value
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("example_weighing_alpha") for k in missing)
    native.load_state_dict({k.replace(".norm.", "."): v for k, v in state.items()})
    for name, layer in native_layers.items():
        replaced = ours.get_submodule(name)
        assert isinstance(replaced, NormWithCarried) and isinstance(replaced.norm, BatchNorm)
        assert type(replaced.act) is type(layer.act) and type(replaced.drop) is type(layer.drop)
    native.eval(), ours.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), native(x), rtol=1e-4, atol=1e-4)


def test_register_refuses_timms_own_names_and_bad_names(timm_tables) -> None:
    with pytest.raises(ValueError, match="timm already has a norm layer named 'batchnorm'"):
        nl_timm.register_as("batchnorm", "bn")
    nl_timm.register_as("batchnorm", "bn", overwrite=True)
    assert isinstance(timm.layers.get_norm_layer("batchnorm")(8), BatchNorm)
    nl_timm.register_as("batchnorm", "gn", num_groups=2)  # ours are replaced without overwrite
    assert isinstance(timm.layers.get_norm_layer("batchnorm")(8), GroupNorm)
    with pytest.raises(ValueError, match="lowercase letters and digits"):
        nl_timm.register_as("my_bgn", "bgn")
    with pytest.raises(ValueError, match="Unknown normalization"):
        nl_timm.register_as("nope", "nope")


def test_register_without_timm_says_how_to_install(without_timm) -> None:
    with pytest.raises(ImportError, match=r'pip install "normlightning\[timm\]"'):
        nl_timm.register()
