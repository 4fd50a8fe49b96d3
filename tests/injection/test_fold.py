"""fold_norms: folded eval outputs equal the unfolded ones (float64), and what cannot be folded is
refused with the layer's name."""

from __future__ import annotations

import re
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize

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


class ConvThenNorm(nn.Module):
    """``step(self, x)`` with a convolution ``conv`` and a BatchNorm2d ``norm``."""

    def __init__(self, step):
        super().__init__()
        self.conv, self.norm, self.step = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), step

    def forward(self, x):
        return self.step(self, x)


def _clamped_without_grad(m, x):
    """``h.clamp_`` under ``torch.no_grad()``: a new version of ``h``, the same autograd node."""
    h = m.conv(x)
    with torch.no_grad():
        h.clamp_(min=0)
    return m.norm(h)


def _conv_without_grad(m, x):
    with torch.no_grad():
        h = m.conv(x)
    return m.norm(h)


def _without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[1].running_mean = model[1].running_var = None  # batch statistics at inference too
    return model


NO_RUNNING_STATISTICS = (
    "1: BatchNorm2d keeps no running statistics (track_running_stats=False, or running_mean set to None)"
)


@pytest.mark.parametrize(
    "make,message",
    [
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
            "2: it is not directly after a convolution (its input is not a Conv1d/2d/3d output)",
        ),
        (lambda: ConvReadTwice(), "norm: the output of the convolution 'conv' before it is also read elsewhere"),
        (
            lambda: ConvNormAndReader(lambda m, x, h, y: (y + h, h)),
            "norm: the output of the convolution 'conv' before it is also read elsewhere",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)),
            "2: the output of the convolution '0' before it is changed in place before the norm layer reads it",
        ),
        (
            lambda: ConvPlusShortcutInPlace(),
            "norm: the output of the convolution 'conv' before it is changed in place before the norm layer reads it",
        ),
        (
            lambda: ConvThenNorm(_clamped_without_grad),
            "norm: the output of the convolution 'conv' before it is changed in place before the norm layer reads it",
        ),
        (
            lambda: ConvThenNorm(_conv_without_grad),
            "norm: the example forward built no autograd graph to check what reads the convolution's output",
        ),
        (
            lambda: ConvNormAndReader(lambda m, x, h, y: (y, m.conv(x))),
            "norm: the convolution 'conv' before it runs 2 times",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormWithActivation(4)),
            "1: BatchNormWithActivation subclasses BatchNorm2d and may do more than normalize (timm's BatchNormAct2d "
            "applies an activation); inject our layers first (norm: bn carries it over)",
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
            NO_RUNNING_STATISTICS,
        ),
        (_without_running_statistics, NO_RUNNING_STATISTICS),
        (
            lambda: nn.Sequential(StandardizingConv(3, 4, 3), nn.BatchNorm2d(4)),
            "1: the convolution '0' before it is a StandardizingConv, whose forward may change its weight (folding "
            "needs a plain Conv1d/2d/3d)",
        ),
    ],
    ids=[
        "after-relu",
        "conv-read-twice",
        "conv-read-twice-and-returned",
        "after-inplace-relu",
        "inplace-shortcut",
        "inplace-without-grad",
        "conv-without-grad",
        "conv-called-twice",
        "bn-subclass",
        "bn-without-running-stats",
        "bn-running-stats-removed",
        "conv-subclass",
    ],
)
def test_refuses_what_the_dataflow_does_not_allow(make, message):
    """The whole message: the first check that fails names the reason (later checks would name others)."""
    model = make().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(nothing was changed\):\n  " + re.escape(message) + "$"):
        fold_norms(model, torch.randn(2, 3, 8, 8))
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
    needs_input = (
        "fold_norms needs example_input (one input of the model) to find the convolution before each norm layer"
    )
    with pytest.raises(ValueError, match="^" + re.escape(needs_input) + "$"):
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


def _with_statistics(model: nn.Module, dtype=D64) -> nn.Module:
    """Random running statistics in every BatchNorm of ``model``, eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, dtype=dtype))
                m.running_var.copy_(torch.rand(m.num_features, dtype=dtype) + 0.5)
    return model.eval()


def _conv_bn(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4))


Pair = namedtuple("Pair", "image offset")


class StructuredInOut(nn.Module):
    """Reads ``(image, offset)`` from a tuple, list or namedtuple and returns ``wrap(norm(conv(image)) + offset)``."""

    def __init__(self, wrap):
        super().__init__()
        self.conv, self.norm, self.wrap = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), wrap

    def forward(self, inputs):
        return self.wrap(self.norm(self.conv(inputs[0])) + inputs[1])


@pytest.mark.parametrize(
    "pack,wrap",
    [
        (tuple, lambda y: {"logits": y}),
        (list, lambda y: (y, y.mean())),
        (lambda args: Pair(*args), lambda y: [y]),
    ],
    ids=["tuple-in-dict-out", "list-in-tuple-out", "namedtuple-in-list-out"],
)
def test_structured_inputs_and_outputs_fold(pack, wrap):
    """Inputs and outputs in containers: the example forward reaches the tensors inside them."""
    model = _with_statistics(StructuredInOut(wrap).double())
    inputs = pack([torch.randn(2, 3, 8, 8, dtype=D64), torch.randn(1, dtype=D64)])
    with torch.no_grad():
        before = model(inputs)
    assert fold_norms(model, inputs) == {"norm": "conv"}
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before, rtol=1e-10, atol=1e-10)


class ChannelStandardizer(nn.Module):
    """A plugin norm layer (its class declares ``uses_batch_statistics``) with no ``weight`` or
    ``bias`` attribute: ``(x - mean) / sqrt(var + eps)`` with fixed statistics, one per channel or
    one shared by all (``channels=1``)."""

    uses_batch_statistics = False

    def __init__(self, channels: int):
        super().__init__()
        self.eps = 1e-3
        self.register_buffer("mean", torch.randn(channels, dtype=D64))
        self.register_buffer("var", torch.rand(channels, dtype=D64) + 0.5)

    def inference_channel_statistics(self):
        return self.mean, self.var

    def forward(self, x):
        return (x - self.mean.view(1, -1, 1, 1)) / torch.sqrt(self.var.view(1, -1, 1, 1) + self.eps)


def test_plugin_layer_without_affine_parameters_folds_by_the_formula():
    """``W'[o] = W[o] / sqrt(var_o + eps)``, ``b'[o] = (b[o] - mean_o) / sqrt(var_o + eps)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), ChannelStandardizer(4)).eval()
    norm, weight, bias = model[1], model[0].weight.detach().clone(), model[0].bias.detach().clone()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    with torch.no_grad():
        before = model(x)
    assert fold_norms(model, x) == {"1": "0"}
    s = 1 / torch.sqrt(norm.var + norm.eps)
    torch.testing.assert_close(model[0].weight.detach(), weight * s.view(4, 1, 1, 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(model[0].bias.detach(), (bias - norm.mean) * s, rtol=1e-12, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_refuses_statistics_with_another_channel_count_than_the_convolution():
    model = nn.Sequential(nn.Conv2d(3, 4, 3).double(), ChannelStandardizer(1)).eval()  # one mean for all channels
    with pytest.raises(ValueError, match=r"\n  1: the convolution '0' before it has a different number of channels$"):
        fold_norms(model, torch.randn(2, 3, 8, 8, dtype=D64))


@pytest.mark.parametrize("parametrized", ["weight", "bias"])
def test_parametrized_convolution_folds_with_the_parametrization_baked_in(parametrized):
    """Folding into a parametrized bias wrote into a value computed on each access: the fold was lost."""

    class Doubled(nn.Module):
        def forward(self, value):
            return 2 * value

    model = _with_statistics(_conv_bn().double())
    parametrize.register_parametrization(model[0], parametrized, Doubled())
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    with torch.no_grad():
        before = model(x)
    assert fold_norms(model, x) == {"1": "0"}
    assert not parametrize.is_parametrized(model[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


def test_float32_convolution_without_bias_gets_a_float32_bias():
    model = _with_statistics(_conv_bn(bias=False), dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    assert fold_norms(model, x) == {"1": "0"}
    assert model[0].weight.dtype == model[0].bias.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_example_input_defaults_to_the_models_example_input_array():
    model = _with_statistics(_conv_bn().double())
    model.example_input_array = torch.randn(2, 3, 8, 8, dtype=D64)
    with torch.no_grad():
        before = model(model.example_input_array)
    assert fold_norms(model) == {"1": "0"}
    with torch.no_grad():
        torch.testing.assert_close(model(model.example_input_array), before, rtol=1e-10, atol=1e-10)


def test_every_unfoldable_layer_is_listed_one_per_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model.eval()[4].train()
    after_relu = "it is not directly after a convolution (its input is not a Conv1d/2d/3d output)"
    training = "BatchNorm2d is in training mode (call model.eval(): folding uses the running statistics)"
    expected = f"fold_norms cannot fold 2 norm layer(s) (nothing was changed):\n  4: {training}\n  2: {after_relu}"
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        fold_norms(model, torch.randn(2, 3, 8, 8))


class TwoBlocks(nn.Module):
    """``norm2(conv2(x))`` after a first block ``norm1(conv1(x))`` that ``first`` may change."""

    def __init__(self, first=None):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.norm2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.first = first or (lambda m, x: m.norm1(m.conv1(x)))

    def forward(self, x):
        return self.norm2(self.conv2(self.first(self, x)))


def _first_in_training_mode():
    model = _with_statistics(TwoBlocks().double())
    model.norm1.train()
    return model


@pytest.mark.parametrize(
    "make,reason",
    [
        (
            _first_in_training_mode,
            "BatchNorm2d is in training mode (call model.eval(): folding uses the running statistics)",
        ),
        (
            lambda: _with_statistics(TwoBlocks(lambda m, x: m.norm1(m.norm1(m.conv1(x)))).double()),
            "the example forward called it 2 times (folding needs exactly one call)",
        ),
    ],
    ids=["first-in-training-mode", "first-called-twice"],
)
def test_skip_unfoldable_folds_the_layers_after_an_unfoldable_one(make, reason, warning_sites):
    model = make()
    x = torch.randn(2, 3, 8, 8, dtype=D64)
    with torch.no_grad():
        before = model(x)
    expected = f"fold_norms left 1 norm layer(s) as they are:\n  norm1: {reason}"
    with pytest.warns(UserWarning, match="^" + re.escape(expected) + "$") as record:
        assert fold_norms(model, x, skip_unfoldable=True) == {"norm2": "conv2"}
    assert warning_sites([w for w in record if "fold_norms" in str(w.message)]) == ["caller"]
    assert isinstance(model.norm1, nn.BatchNorm2d) and isinstance(model.norm2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-10)


class ConvOutputReturned(nn.Module):
    """Returns ``pack(h, y)``: the convolution's output ``h`` beside ``y = after_norm(self, h)``, which
    may cut ``norm(h)`` from the autograd graph; control flow on a value keeps torch.fx from tracing it."""

    def __init__(self, after_norm, pack=lambda h, y: (h, y)):
        super().__init__()
        self.conv, self.norm, self.after_norm, self.pack = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), after_norm, pack

    def forward(self, x):
        h = self.conv(x)
        y = self.after_norm(self, h)
        if x.mean() > 0:
            y = y + 1
        return self.pack(h, y)


OUTPUT_READ_BY_NO_OP = "the output of the convolution 'conv' before it is also read elsewhere"


def _norm_without_grad(m, h):
    with torch.no_grad():
        return m.norm(h)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: ConvOutputReturned(lambda m, h: m.norm(h)), OUTPUT_READ_BY_NO_OP),
        (lambda: ConvOutputReturned(lambda m, h: m.norm(h).detach()), OUTPUT_READ_BY_NO_OP),
        (
            lambda: ConvOutputReturned(lambda m, h: m.norm(h).detach(), lambda h, y: {"features": h, "logits": y}),
            OUTPUT_READ_BY_NO_OP,
        ),
        (
            lambda: ConvOutputReturned(_norm_without_grad),
            "the example forward built no autograd graph to check what reads the convolution's output",
        ),
    ],
    ids=["norm-output-returned", "norm-output-detached", "norm-output-detached-dict", "norm-without-grad"],
)
def test_assume_exclusive_never_overrides_a_returned_convolution_output(make, reason):
    """Returning ``h`` (in a tuple or a dict) is a read that no op shows. The three last cases folded on
    main (the norm layer's own read was counted only through the model's outputs, and ``h`` returned
    counted as its one reader): ``h`` came back normalized."""
    model = _with_statistics(make().double())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"\(nothing was changed\):\n  norm: " + re.escape(reason) + "$"):
        fold_norms(model, torch.randn(2, 3, 8, 8, dtype=D64), assume_exclusive=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
