"""fold_norms: folded eval outputs equal the unfolded ones (float64), and what cannot be folded is
refused with the layer's name."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from normlightning.injection import fold_norms, get_spec, inject
from normlightning.models import build_backbone
from normlightning.models.small_cnn import SmallCNN
from normlightning.tasks.classification import ClassificationTask

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


class ConvPlusShortcutInPlace(nn.Module):
    """``conv(x) += shortcut`` before the norm (the last block of a pre-activation ResNet)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        y += x
        return self.norm(y)


class BatchNormWithActivation(nn.BatchNorm2d):
    """A BatchNorm2d subclass that does more than normalize (as timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class StandardizingConv(nn.Conv2d):
    """A Conv2d subclass that rewrites its weight on every call (as WSConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
            "2: it is not directly after a convolution",
        ),
        (lambda: ConvReadTwice(), "norm: the output of the convolution 'conv' before it is also read elsewhere"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)),
            "2: the output of the convolution '0' before it is changed in place",
        ),
        (lambda: ConvPlusShortcutInPlace(), "norm: the output of the convolution 'conv' before it is changed in place"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormWithActivation(4)),
            "1: BatchNormWithActivation subclasses BatchNorm2d",
        ),
        (
            lambda: nn.Sequential(StandardizingConv(3, 4, 3), nn.BatchNorm2d(4)),
            "1: the convolution '0' before it is a StandardizingConv",
        ),
    ],
    ids=["after-relu", "conv-read-twice", "after-inplace-relu", "inplace-shortcut", "bn-subclass", "conv-subclass"],
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
    inject(
        model,
        method="bn",
        overrides=[{"pattern": r"features\.1\.1", "method": "gn", "num_groups": 2}],
        example_input=torch.zeros(2, 3, 8, 8),
        batch_size=4,
    )
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


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, inputs):
        return self.norm(self.conv(inputs["image"]))


def test_structured_input_with_frozen_parameters_folds():
    """A dict input and no parameter requiring a gradient: the example forward still traces."""
    model = DictInput().double().eval().requires_grad_(False)
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.randn(4, dtype=D64))
        model.norm.running_var.copy_(torch.rand(4, dtype=D64) + 0.5)
    x = {"image": torch.randn(2, 3, 8, 8, dtype=D64)}
    before = model(x)
    assert fold_norms(model, x) == {"norm": "conv"}
    torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


class ConvNormAndReader(nn.Module):
    """``combine(self, x, h, norm(h))`` with ``h = conv(x)``: ``combine`` adds a reader of ``h`` or of
    the convolution's parameters that the autograd graph does not show."""

    def __init__(self, combine):
        super().__init__()
        self.conv, self.norm, self.combine = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), combine
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return self.combine(self, x, h, self.norm(h))


def _read_under_no_grad(m, x, h, y):
    with torch.no_grad():
        peak = h.abs().amax()
    return y + peak


def _share(parameter):
    def make():
        model = ConvNormAndReader(lambda m, x, h, y: y + m.conv2(x))
        setattr(model.conv2, parameter, getattr(model.conv, parameter))
        return model

    return make


OUTPUT_READ = r"the output of the convolution 'conv' before it is also read elsewhere \(by "
PARAMETER_READ = r"a parameter of the convolution 'conv' before it is also read elsewhere \(by "
PARAMETER_SHARED = r"a parameter of the convolution 'conv' before it is shared \("


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ConvNormAndReader(lambda m, x, h, y: y * (h > 0)), OUTPUT_READ + "gt in the traced graph"),
        (lambda: ConvNormAndReader(lambda m, x, h, y: y + h.detach().mean()), OUTPUT_READ + r"\.detach\(\)"),
        (_share("weight"), PARAMETER_SHARED + "'conv.weight' is also 'conv2.weight'"),
        (
            lambda: ConvNormAndReader(lambda m, x, h, y: y + F.conv2d(x, m.conv.weight, dilation=2, padding=2)),
            PARAMETER_READ + "attribute 'conv.weight' in the traced graph",
        ),
        (lambda: ConvNormAndReader(_read_under_no_grad), OUTPUT_READ + r"\.abs\(\) in the traced graph"),
        (_share("bias"), PARAMETER_SHARED + "'conv.bias' is also 'conv2.bias'"),
    ],
    ids=["mask-by-output", "detached-output", "shared-weight", "functional-weight", "no-grad-reader", "shared-bias"],
)
def test_refuses_readers_the_autograd_graph_does_not_show(make, match):
    """Each of these folded without an error before fold_norms checked the module tree and a torch.fx trace."""
    model = make().double().eval()
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.randn(4, dtype=D64))
        model.norm.running_var.copy_(torch.rand(4, dtype=D64) + 0.5)
    state, attributes = {k: v.clone() for k, v in model.state_dict().items()}, set(vars(model))
    with pytest.raises(ValueError, match=r"cannot fold 1 norm layer\(s\) \(nothing was changed\):\n  norm: " + match):
        fold_norms(model, torch.randn(2, 3, 8, 8, dtype=D64))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert set(vars(model)) == attributes  # the trace's tensor constants are not left on the model


def test_refuses_a_parameter_read_that_only_the_example_forward_shows():
    """The weight's storage reached through a plain list: tracing computes its sum once, as a
    constant; the ops of the example forward show the read."""
    model = ConvNormAndReader(lambda m, x, h, y: y + x.mean() * m.hidden[0].sum()).eval()
    model.hidden = [model.conv.weight.detach()]
    attributes = set(vars(model))
    with pytest.raises(ValueError, match=r"norm: " + PARAMETER_READ + r"sum in the example forward\)"):
        fold_norms(model, torch.randn(2, 3, 8, 8))
    assert set(vars(model)) == attributes  # the trace's tensor constant (the sum) is not left on the model


class KeepsConvOutput(ConvNormAndReader):
    """Keeps the convolution's output on the module (feature extraction for a later loss)."""

    def forward(self, x):
        self.features = self.conv(x)
        return self.norm(self.features)


def test_refuses_an_output_kept_on_a_module():
    model = KeepsConvOutput(None).eval()
    with pytest.raises(ValueError, match="norm: " + OUTPUT_READ + "the attribute 'features' that keeps it"):
        fold_norms(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model.features, torch.Tensor)  # what tracing stored there (a proxy) is undone


@pytest.mark.parametrize(
    "hook,match",
    [
        (
            lambda m: m.conv.register_forward_hook(lambda module, args, out: None),
            "norm: the convolution 'conv' before it has forward hooks, which read its output",
        ),
        (
            lambda m: m.norm.register_forward_pre_hook(lambda module, args: None),
            "norm: it has forward hooks, which folding would drop",
        ),
    ],
    ids=["conv-hook", "norm-hook"],
)
def test_refuses_hooks(hook, match):
    model = ConvNormAndReader(lambda m, x, h, y: y).eval()
    hook(model)
    with pytest.raises(ValueError, match=match):
        fold_norms(model, torch.randn(2, 3, 8, 8))


class ValueDependentBranch(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.norm(self.conv(x))
        return y.relu() if x.mean() > 0 else y


def test_untraceable_model_folds_only_on_the_users_promise():
    model = ValueDependentBranch().double().eval()
    with torch.no_grad():
        model.norm.running_mean.copy_(torch.randn(4, dtype=D64))
        model.norm.running_var.copy_(torch.rand(4, dtype=D64) + 0.5)
    x = torch.randn(3, 3, 8, 8, dtype=D64)
    with pytest.raises(ValueError, match="norm: torch.fx cannot trace the model .*pass assume_exclusive=True"):
        fold_norms(model, x)
    with torch.no_grad():
        before = model(x), model(-x.abs())
    assert fold_norms(model, x, assume_exclusive=True) == {"norm": "conv"}
    with torch.no_grad():
        torch.testing.assert_close((model(x), model(-x.abs())), before, rtol=1e-10, atol=1e-10)


class ValueDependentBranchReadingDetached(ValueDependentBranch):
    def forward(self, x):
        h = self.conv(x)
        y = self.norm(h) + h.detach().mean()
        return y.relu() if x.mean() > 0 else y


def test_assume_exclusive_never_overrides_what_the_module_tree_or_example_forward_shows():
    model = ValueDependentBranch().eval()
    model.conv2 = nn.Conv2d(3, 4, 3)
    model.conv2.weight = model.conv.weight
    with pytest.raises(ValueError, match="norm: a parameter of the convolution 'conv' before it is shared"):
        fold_norms(model, torch.randn(2, 3, 8, 8), assume_exclusive=True)
    model = ValueDependentBranchReadingDetached().eval()
    with pytest.raises(ValueError, match="norm: " + OUTPUT_READ + "detach, mean in the example forward"):
        fold_norms(model, torch.randn(2, 3, 8, 8), assume_exclusive=True)


def test_shape_checks_outside_the_convolutions_do_not_stop_the_trace():
    """A task (its input normalization checks shapes in Python) and ResNet-12 (its cosine classifier
    does) trace: modules with no convolution or norm layer inside are single calls in the graph."""
    task = ClassificationTask(backbone="small_cnn", num_classes=10, input_shape=(3, 8, 8)).double()
    _check_folds(_warmed(task, (4, 3, 8, 8)), (3, 3, 8, 8), expected=4)
    resnet12 = build_backbone("resnet12", 10, (3, 16, 16), widths=(4, 4, 4, 4)).double()
    _check_folds(_warmed(resnet12, (4, 3, 16, 16)), (3, 3, 16, 16), expected=16)
