"""Injection on real architectures (torchvision and ours) and parameter normalizations (WS / WN)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from normlightning.injection import inject
from normlightning.injection.apply import apply_param_norm, apply_spec
from normlightning.models import available_backbones, build_backbone
from normlightning.norms.base import NormLayer


def count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_torchvision_models_have_no_batchnorm_left(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=5)
    n_bn = count(model, nn.modules.batchnorm._BatchNorm)
    # gn's channel groups must divide C: densenet's C = 64 + 32k etc., so fit with `nearest`
    spec = inject(model, method="gn", num_groups=32, group_fit="nearest")[0]
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert count(model, NormLayer) == n_bn == len(spec["layers"])
    for rec in spec["layers"]:
        c, g = rec["kwargs"]["num_features"], rec["kwargs"]["num_groups"]
        assert c % g == 0 and g <= 32
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5)


def test_bgn_auto_on_resnet18_with_exclusions():
    model = torchvision.models.resnet18(num_classes=5)
    spec, _ = inject(
        model,
        method="bgn",
        num_groups="auto",
        batch_size=8,
        exclude=[r"bn1", r"layer1\.0\..*"],
        example_input=torch.rand(2, 3, 32, 32),
    )
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert kept == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]
    # batch 8 -> G = 16, which divides every layer's D = C*H*W here
    assert {r["kwargs"]["num_groups"] for r in spec["layers"]} == {16}
    model.train()
    assert model(torch.rand(4, 3, 32, 32)).shape == (4, 5)


OURS = [
    "small_cnn",
    "cifar_resnet18",
    "wide_resnet",
    "resnet12",
    "cifar_mobilenet_v2",
    "cifar_shufflenet_v2",
    "cifar_densenet121",
    "mlp",
]


@pytest.mark.parametrize("name", OURS)
def test_our_backbones_have_no_batchnorm_left(name):
    assert name in available_backbones()
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=4, input_shape=(3, 16, 16))
    n_bn = count(model, nn.modules.batchnorm._BatchNorm)
    assert n_bn > 0, f"{name} has no BatchNorm to replace"
    inject(model, method="gn", num_groups=4, group_fit="nearest")[0]
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert count(model, NormLayer) >= n_bn


@pytest.mark.parametrize("kind", ["weight_standardization", "weight_norm", "weight_centering"])
def test_param_norms_on_convs_replay_from_spec(kind):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(8, 2))

    model = make()
    raw = model[0].weight.detach().clone()
    spec, _ = inject(model, method="gn", num_groups=2, param_norm_exclude=[r"2"], param_norm=kind)
    assert spec["param_norms"] == [{"name": "0", "kind": kind}]
    w = model[0].weight
    if kind == "weight_standardization":
        flat = raw.flatten(1)
        expected = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(w.flatten(1), expected)
    elif kind == "weight_centering":  # w - mean(w[o]) over (in, *kernel)
        flat = raw.flatten(1)
        torch.testing.assert_close(w.flatten(1), flat - flat.mean(1, keepdim=True))
    else:  # weight norm initialised to reproduce the raw weight
        torch.testing.assert_close(w, raw)
    assert not torch.nn.utils.parametrize.is_parametrized(model[2])
    fresh = make()
    apply_spec(fresh, spec)
    fresh.load_state_dict(model.state_dict())  # the parametrized keys line up
    x = torch.rand(2, 3, 4, 4)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


def test_an_unknown_parameter_normalization_is_refused_naming_the_valid_ones():
    linear = nn.Linear(3, 2)
    with pytest.raises(
        ValueError,
        match=r"^unknown parameter normalization 'weight_scaling'; valid: weight_standardization, weight_norm, "
        r"weight_centering$",
    ):
        apply_param_norm(linear, "weight_scaling")
    assert not torch.nn.utils.parametrize.is_parametrized(linear)
