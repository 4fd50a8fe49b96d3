"""``norm_layer(name, **kwargs)``: our layers as torchvision's and timm's ``norm_layer=`` argument."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torchvision
from torch import nn

from normlightning.norms import BatchGroupNorm, BatchNorm, GroupNorm, NormWithCarried, norm_layer


def test_torchvision_resnet_with_gn_matches_native_group_norm() -> None:
    """``norm_layer("gn", num_groups=32)`` in a torchvision ResNet computes what ``nn.GroupNorm(32, C)`` does."""
    torch.manual_seed(0)
    ours = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer("gn", num_groups=32))
    native = torchvision.models.resnet18(num_classes=5, norm_layer=lambda c: nn.GroupNorm(32, c))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in native.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=g))
    ours.load_state_dict(native.state_dict())
    assert sum(isinstance(m, GroupNorm) for m in ours.modules()) == 20
    assert all(m.num_groups == 32 for m in ours.modules() if isinstance(m, GroupNorm))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), native(x), rtol=1e-4, atol=1e-5)


def test_torchvision_resnet_with_bgn_and_the_divisibility_catch() -> None:
    model = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer("bgn", num_groups=64))
    layers = [m for m in model.modules() if isinstance(m, BatchGroupNorm)]
    assert len(layers) == 20 and {m.num_groups for m in layers} == {64}
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 5)  # 64 divides every C (64..512), so every C*H*W
    # 96 divides no C*H*W of the stem (64*16*16 = 2^14): the first forward says so
    bad = torchvision.models.resnet18(num_classes=5, norm_layer=norm_layer("bgn", num_groups=96))
    with pytest.raises(ValueError, match="num_groups"):
        bad(torch.rand(4, 3, 32, 32))


def test_keyword_arguments_of_the_call_map_onto_the_layer() -> None:
    make = norm_layer("bn", eps=1e-3)
    layer = make(8, momentum=0.2, affine=False, device="cpu", dtype=torch.float64)
    assert isinstance(layer, BatchNorm) and layer.eps == 1e-3 and layer.momentum == 0.2
    assert layer.weight is None and layer.running_mean.dtype == torch.float64
    assert make(8, eps=1e-4).eps == 1e-4  # the call wins over the bound value, as with functools.partial
    assert make(8, track_running_stats=True).momentum == 0.1
    with pytest.raises(ValueError, match="track_running_stats=False"):  # ghost always keeps running statistics
        norm_layer("ghost", num_groups=2)(8, track_running_stats=False)
    assert make(8, track_running_stats=False).running_mean is None  # bn takes it (batch statistics at inference)
    gn = norm_layer("gn", num_groups=4)(8, eps=1e-3, momentum=0.1, track_running_stats=False)  # no running stats
    assert isinstance(gn, GroupNorm) and gn.eps == 1e-3 and not hasattr(gn, "momentum")
    with pytest.raises(TypeError, match="build_norm\\('gn'\\)"):
        norm_layer("gn", num_groups=4)(8, unknown=1)
    with pytest.raises(ValueError, match="Unknown normalization 'nope'"):
        norm_layer("nope")
    assert make.method == "bn" and make.kwargs == {"eps": 1e-3} and make.__name__ == "bn_norm_layer"


def test_norm_act_arguments_build_timms_structure_with_the_same_output() -> None:
    """With timm's norm + activation arguments the layer is ours followed by ``drop`` and ``act``;
    our ``bn`` so built computes what timm's own ``BatchNormAct2d`` does."""
    ours = norm_layer("bn")(8, act_layer="silu", inplace=False)
    native = timm.layers.BatchNormAct2d(8, act_layer="silu", inplace=False)
    assert isinstance(ours, NormWithCarried) and isinstance(ours.act, nn.SiLU) and isinstance(ours.drop, nn.Identity)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.normal_()
        ours.norm.weight.copy_(native.weight)
        ours.norm.bias.copy_(native.bias)
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    torch.testing.assert_close(ours(x), native(x))  # training mode: batch statistics
    torch.testing.assert_close(ours.norm.running_var, native.running_var)
    quiet = norm_layer("bn")(8, act_layer="relu", apply_act=False, drop_layer=nn.Dropout)
    assert isinstance(quiet.act, nn.Identity) and isinstance(quiet.drop, nn.Dropout)
    bound = norm_layer("gn", num_groups=2, act_layer="gelu")(8).act  # a bound activation, made by timm's factory
    assert type(bound) is type(timm.layers.create_act_layer("gelu"))


def test_norm_act_call_without_an_activation_is_refused() -> None:
    """timm gives a plain function no ``act_layer``: guessing timm's ReLU default would silently
    change e.g. an EfficientNet's SiLU network."""
    with pytest.raises(ValueError, match="without act_layer.*register\\(\\)"):
        timm.create_model("efficientnet_b0", num_classes=3, norm_layer=norm_layer("bn"))
    model = timm.create_model("efficientnet_b0", num_classes=3, norm_layer=norm_layer("bn", act_layer="silu"))
    assert isinstance(model.bn1.act, nn.SiLU) and isinstance(model.bn1.norm, BatchNorm)


def test_timm_resolves_the_function_and_rebinds_a_partial_of_it() -> None:
    """timm unbinds a ``functools.partial`` and rebinds only its keywords: a partial of our function
    keeps the method, where ``partial(build_norm, "bgn", ...)`` would lose its positional ``"bgn"``."""
    layer = timm.layers.get_norm_layer(norm_layer("bgn", num_groups=64))(64)
    assert isinstance(layer, BatchGroupNorm) and layer.num_groups == 64
    rebound = timm.layers.get_norm_layer(functools.partial(norm_layer("gn"), num_groups=16))(64)
    assert isinstance(rebound, GroupNorm) and rebound.num_groups == 16
