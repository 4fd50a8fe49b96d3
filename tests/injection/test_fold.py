"""fold_norms: folded eval outputs equal the unfolded ones (float64), and what cannot be folded is
refused with the layer's name."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from normlightning.injection import fold_norms, get_spec, inject
from normlightning.models.small_cnn import SmallCNN

D64 = torch.float64


def _warmed(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """Random affine parameters and running statistics away from their initial values, eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("weight", "bias")) and p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
        for name, p in model.named_parameters():  # hn mixture logits
            if name.endswith("std_weight"):
                p.copy_(torch.randn_like(p))
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, dtype=D64) * 2 + 1)
    return model.eval()


def _check_folds(model: nn.Module, shape, expected: int) -> None:
    x = torch.randn(shape, dtype=D64)
    with torch.no_grad():
        before = model(x)
    folded = fold_norms(model, x[:2])
    assert len(folded) == expected
    assert all(isinstance(model.get_submodule(name), nn.Identity) for name in folded)
    assert all(model.get_submodule(conv).bias is not None for conv in folded.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "settings",
    [
        None,  # native BatchNorm2d
        {"method": "bn"},
        {"method": "brn"},
        {"method": "ghost", "num_groups": 2},
        {"method": "bgn", "num_groups": 4},
        {"method": "gbgn", "kwargs": {"channel_groups": 8}},
        {"method": "hn"},
        {"method": "hn", "kwargs": {"mean": "en:4", "std": "bn+en:1"}},
        {"method": "hn", "kwargs": {"mean": "bn", "std": "en:4"}, "weight_standardization": True},
    ],
    ids=["native", "bn", "brn", "ghost", "bgn", "gbgn", "hn", "hn-mixture", "hn-ws"],
)
def test_small_cnn_folded_outputs_equal_unfolded(settings):
    model = SmallCNN(3, 10, width=8).double()
    if settings is not None:
        settings = dict(settings)
        param_norm = "weight_standardization" if settings.pop("weight_standardization", False) else None
        inject(model, example_input=torch.zeros(2, 3, 8, 8, dtype=D64), batch_size=4, param_norm=param_norm, **settings)
    _check_folds(_warmed(model, (4, 3, 8, 8)), (5, 3, 8, 8), expected=4)
    assert get_spec(model) is None  # the injected layers are gone


def test_resnet18_folded_outputs_equal_unfolded():
    model = torchvision.models.resnet18(num_classes=10).double()
    inject(model, method="hn", example_input=torch.zeros(2, 3, 32, 32, dtype=D64), batch_size=4)
    _check_folds(_warmed(model, (4, 3, 32, 32), steps=2), (3, 3, 32, 32), expected=20)  # 17 convs + 3 downsamples


class ConvReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), "2: it is not directly after a convolution"),
        (lambda: ConvReadTwice(), "norm: the output of the convolution 'conv' before it is also read elsewhere"),
    ],
    ids=["after-relu", "conv-read-twice"],
)
def test_refuses_what_the_dataflow_does_not_allow(make, match):
    model = make().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as info:
        fold_norms(model, torch.randn(2, 3, 8, 8))
    assert "nothing was changed" in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "settings,match",
    [
        ({"method": "gn", "num_groups": 4}, "GroupNorm computes its statistics from each input"),
        ({"method": "sn"}, "SwitchableNorm computes its statistics from each input"),
        ({"method": "hn", "kwargs": {"mean": "in", "std": "en:1"}}, r"the set\(s\) \['in'\] are per example"),
        ({"method": "bgn", "num_groups": 16}, "groups split channels"),
        ({"method": "bn", "kwargs": {"alpha": 0.2}}, "alpha=0.2"),
    ],
    ids=["gn", "sn", "hn-per-example", "bgn-channel-splitting", "bn-example-weighing"],
)
def test_refuses_statistics_that_are_not_per_channel(settings, match):
    model = SmallCNN(3, 10, width=8)
    inject(model, example_input=torch.zeros(2, 3, 8, 8), batch_size=4, **settings)
    model = _warmed(model.double(), (4, 3, 8, 8))
    with pytest.raises(ValueError, match=f"features.0.1: .*{match}"):
        fold_norms(model, torch.randn(2, 3, 8, 8, dtype=D64))


def test_refuses_training_mode_and_needs_an_input():
    model = SmallCNN(3, 10, width=8)
    with pytest.raises(ValueError, match="features.0.1: BatchNorm2d is in training mode"):
        fold_norms(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="needs example_input"):
        fold_norms(model.eval())


def test_skip_unfoldable_and_exclude_leave_those_layers():
    model = SmallCNN(3, 10, width=8)
    inject(model, method="bn", overrides=[{"pattern": r"features\.1\.1", "method": "gn", "num_groups": 2}],
           example_input=torch.zeros(2, 3, 8, 8), batch_size=4)
    model = _warmed(model.double(), (4, 3, 8, 8))
    x = torch.randn(3, 3, 8, 8, dtype=D64)
    with torch.no_grad():
        before = model(x)
    with pytest.warns(UserWarning, match="features.1.1: GroupNorm"):
        folded = fold_norms(model, x, skip_unfoldable=True, exclude=[r"features\.4\.1"])
    assert sorted(folded) == ["features.0.1", "features.3.1"]
    assert type(model.features[1][1]).__name__ == "GroupNorm" and type(model.features[4][1]).__name__ == "BatchNorm"
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)
