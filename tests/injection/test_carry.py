"""Injection keeps what a norm layer does besides normalizing (timm's BatchNormAct2d: dropout and
activation after the norm), matches targets by exact type, and refuses what it cannot carry."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from normlightning.injection import inject
from normlightning.injection.apply import apply_spec
from normlightning.norms import BatchNorm, GroupNorm, NormWithCarried


def randomize_batchnorms(model: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics in every native BatchNorm."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm/"):
        return timm.create_model(name[5:], pretrained=False, num_classes=7)
    return torchvision.models.get_model(name, num_classes=7)


MODELS = ["resnet18", "mobilenet_v3_small", "timm/efficientnet_b0", "timm/regnety_002", "timm/resnet18"]


@pytest.mark.parametrize("name", MODELS)
def test_injecting_our_bn_leaves_eval_outputs_unchanged(name):
    """Our ``bn`` with the copied parameters and statistics computes the same eval map as the
    native layers, activations included: outputs equal to float32 rounding."""
    model = build(name)
    randomize_batchnorms(model)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    n_native = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    spec, _ = inject(model, method="bn", example_input=x)
    assert len(spec["layers"]) == n_native > 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_gn_on_efficientnet_keeps_every_activation():
    model = build("timm/efficientnet_b0")
    acts = {n: type(m.act) for n, m in model.named_modules() if isinstance(m, timm.layers.BatchNormAct2d)}
    assert nn.SiLU in acts.values()
    spec, rows = inject(model, method="gn", num_groups=8, group_fit="nearest", example_input=torch.rand(2, 3, 64, 64))
    for name, act_type in acts.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, NormWithCarried) and isinstance(layer.norm, GroupNorm)
        assert type(layer.act) is act_type and layer.carried_names == ("drop", "act")
    carried = [r for r in spec["layers"] if r.get("carried")]
    assert len(carried) == len(acts) and all(r["carried"] == ["drop", "act"] for r in carried)
    assert any("+ drop, act" in r["new"] for r in rows)
    x = torch.rand(3, 3, 64, 64)
    assert model(x).shape == (3, 7)

    fresh = build("timm/efficientnet_b0")  # a checkpoint restore rebuilds the same structure
    apply_spec(fresh, spec)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


class ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward is not plain batch norm (doubles the output)."""

    def forward(self, x):
        return 2 * super().forward(x)


class PlainSubclassBN(nn.BatchNorm2d):
    """A subclass that adds nothing to BatchNorm2d's normalization."""


def _net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU())


def test_targets_match_exact_types_and_subclasses_are_reported_kept():
    model = _net(PlainSubclassBN(4))
    with pytest.warns(UserWarning, match=r"nothing in Sequential was replaced: all 1 of its target layers were kept"):
        spec, rows = inject(model, method="bn")
    assert spec["layers"] == [] and type(model[1]) is PlainSubclassBN
    (row,) = rows
    assert row["new"] == "(kept)" and f"{__name__}.PlainSubclassBN" in row["args"]


def test_a_listed_subclass_that_only_normalizes_is_replaced():
    model = _net(PlainSubclassBN(4))
    spec, _ = inject(model, method="bn", targets=[f"{__name__}.PlainSubclassBN"])
    assert type(model[1]) is BatchNorm and "carried" not in spec["layers"][0]


def test_a_subclass_with_its_own_forward_is_a_clear_error():
    model = _net(ScaledBN(4))
    with pytest.raises(
        ValueError, match=rf"layer '1' is a {__name__}\.ScaledBN.*cannot carry that over.*norm\.exclude"
    ):
        inject(model, method="gn", num_groups=2, targets=[f"{__name__}.ScaledBN"])
    assert type(model[1]) is ScaledBN  # nothing changed
