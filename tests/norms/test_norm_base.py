"""What ``normlightning.norms.base`` gives every layer, checked on the base classes themselves: the
printed form, the effective arguments and their error, the checks of the constructor arguments and
of the input, the running buffers and their reset, and the averaging factor of an update.

Expected values are written out by hand (the repr strings, the error messages, ``1 / t`` for a
cumulative average)."""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms import build_norm
from normlightning.norms.base import BatchStatNorm, NormLayer


class _ForgetsAnArgument(NormLayer):
    """A layer whose constructor takes ``width`` but keeps no attribute for it."""

    def __init__(self, num_features: int, width: int = 3) -> None:
        super().__init__(num_features)


def test_effective_args_names_the_argument_the_layer_does_not_keep() -> None:
    expected = (
        "_ForgetsAnArgument keeps no attribute 'width' for its constructor argument 'width'; "
        "store it, or map it in the class's argument_attributes"
    )
    with pytest.raises(AttributeError, match="^" + re.escape(expected) + "$"):
        _ForgetsAnArgument(4).effective_args()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, "BatchNorm(4, eps=1e-05, affine=True, momentum=0.1)"),
        (
            {"track_running_stats": False},
            "BatchNorm(4, eps=1e-05, affine=True, momentum=0.1, track_running_stats=False)",
        ),
        ({"virtual_devices": 2}, "BatchNorm(4, eps=1e-05, affine=True, momentum=0.1, virtual_devices=2)"),
        (
            {"eps": 1e-3, "momentum": None, "affine": False, "track_running_stats": False, "virtual_devices": 3},
            "BatchNorm(4, eps=0.001, affine=False, momentum=None, track_running_stats=False, virtual_devices=3)",
        ),
    ],
    ids=["defaults", "untracked", "virtual", "all-set"],
)
def test_repr_shows_every_setting_that_differs_from_its_default(kwargs: dict, expected: str) -> None:
    assert repr(build_norm("bn", 4, **kwargs)) == expected


def test_loading_an_alpha_out_of_range_names_the_layer_and_the_key() -> None:
    layer = build_norm("bn", 4)
    state = layer.state_dict()
    state["example_weighing_alpha"] = torch.tensor(1.5)
    expected = "example_weighing_alpha: BatchNorm: alpha must be a float in [0, 1] (0 = plain inference), got 1.5."
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        layer.load_state_dict(state)
    assert layer.alpha == 0.0


def test_a_strict_load_into_an_example_weighing_layer_refuses_an_unexpected_key() -> None:
    """``load_state_dict(strict=True)`` reports a key under the layer's prefix that it does not have, as
    ``nn.BatchNorm2d`` does; a non-strict load ignores it."""
    layer, native = build_norm("bn", 4), torch.nn.BatchNorm2d(4)
    for module in (layer, native):
        state = {**module.state_dict(), "bogus": torch.zeros(())}
        with pytest.raises(RuntimeError, match=re.escape('Unexpected key(s) in state_dict: "bogus".')):
            module.load_state_dict(state)
        assert module.load_state_dict(state, strict=False).unexpected_keys == ["bogus"]


def test_a_load_with_a_wrongly_shaped_statistic_reports_the_size_mismatch() -> None:
    layer = build_norm("bn", 4)
    state = {**layer.state_dict(), "running_mean": torch.zeros(5)}
    with pytest.raises(RuntimeError, match=re.escape("size mismatch for running_mean")):
        layer.load_state_dict(state)


@pytest.mark.parametrize("value", [True, False, -0.1, 1.01, "0.5", None], ids=repr)
def test_alpha_refuses_what_is_not_a_float_in_the_unit_interval(value) -> None:
    layer = build_norm("bn", 4)
    expected = f"BatchNorm: alpha must be a float in [0, 1] (0 = plain inference), got {value!r}."
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        layer.alpha = value
    assert layer.alpha == 0.0


def test_alpha_buffer_is_float32_and_every_tensor_on_the_layers_device() -> None:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = build_norm("bn", 4)
        meta = build_norm("bn", 4, device="meta")
    finally:
        torch.set_default_dtype(default)
    assert layer.example_weighing_alpha.dtype == torch.float32
    assert {t.device.type for t in (*meta.parameters(), *meta.buffers())} == {"meta"}


def test_inference_statistics_with_alpha_name_the_setting() -> None:
    layer = build_norm("bn", 4).eval()
    layer.alpha = 0.25
    expected = (
        "BatchNorm has alpha=0.25 (inference example weighing): its inference statistics depend on each "
        "example; set alpha = 0"
    )
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        layer.inference_channel_statistics()


def test_virtual_devices_with_synchronized_statistics_are_refused_naming_both_settings() -> None:
    layer = build_norm("bn", 4, virtual_devices=2)
    layer.sync_statistics = True
    expected = (
        "BatchNorm: norm.virtual_devices=2 together with synchronized statistics (norm.sync, "
        "trainer.sync_batchnorm or NormSync) is not supported: virtual devices split each process's "
        "batch, sync pools it across processes. Set norm.sync: false or norm.virtual_devices: 1"
    )
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        layer(torch.randn(4, 4, 2, 2))


@pytest.mark.parametrize("name, kwargs", [("bn", {}), ("ghost", {"num_groups": 2}), ("bgn", {"num_groups": 2})])
def test_eval_with_kept_statistics_uses_the_layers_eps(name: str, kwargs: dict) -> None:
    """``y = gamma (x - mean) / sqrt(var + eps) + beta`` with the layer's ``eps`` (0.5 here, not the default)."""
    torch.manual_seed(0)
    layer = build_norm(name, 4, eps=0.5, **kwargs).double()
    layer(torch.randn(6, 4, 3, 3, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    layer.eval()
    mean, var = (s.view(1, -1, 1, 1) for s in layer.inference_channel_statistics())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = layer.weight.view(1, -1, 1, 1) * (x - mean) / torch.sqrt(var + 0.5) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


class _PlainBatchStatistics(BatchStatNorm):
    """A layer with running statistics that keeps every default of the base."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self._register_running("running_mean", (num_features,), 0.0)


def test_layers_with_running_statistics_default_to_batchnorms_settings() -> None:
    layer, native = _PlainBatchStatistics(4), torch.nn.BatchNorm2d(4)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
        native.eps,
        native.momentum,
        native.affine,
        native.track_running_stats,
    )
    assert layer.virtual_devices == 1 and layer.running_stat_names == ("running_mean",)
    assert layer.sync_statistics is False and layer.process_group is None  # per-process statistics until a plugin
    assert layer.num_batches_tracked.dtype == native.num_batches_tracked.dtype == torch.long
    assert int(layer.num_batches_tracked) == int(native.num_batches_tracked) == 0


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, None])
def test_momentum_accepts_both_ends_of_the_unit_interval_and_none(momentum) -> None:
    assert _PlainBatchStatistics(4, momentum=momentum).momentum == (None if momentum is None else float(momentum))


@pytest.mark.parametrize("momentum", [-0.01, 1.01, "0.1"])
def test_momentum_outside_the_unit_interval_is_refused(momentum) -> None:
    expected = f"_PlainBatchStatistics: momentum must be in [0, 1] or None (cumulative average), got {momentum!r}."
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        _PlainBatchStatistics(4, momentum=momentum)


def test_a_batch_that_does_not_split_into_the_virtual_devices_is_refused_naming_the_fix() -> None:
    expected = (
        "BatchNorm: a training batch of N=5 examples does not split into norm.virtual_devices=2 equal chunks. "
        "Set data.batch_size to a multiple of 2 (with data.drop_last: true when an epoch's last batch is "
        "smaller), or a norm.virtual_devices that divides it."
    )
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        build_norm("bn", 4, virtual_devices=2)(torch.randn(5, 4, 2, 2))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"track_running_stats": 1}, "track_running_stats must be True or False, got 1."),
        ({"virtual_devices": 0}, "virtual_devices (norm.virtual_devices) must be a positive int, got 0."),
        ({"virtual_devices": True}, "virtual_devices (norm.virtual_devices) must be a positive int, got True."),
        ({"virtual_devices": 2.0}, "virtual_devices (norm.virtual_devices) must be a positive int, got 2.0."),
    ],
    ids=["track-not-bool", "virtual-zero", "virtual-bool", "virtual-float"],
)
def test_bad_running_statistics_settings_are_refused_naming_the_layer(kwargs: dict, expected: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape("_PlainBatchStatistics: " + expected) + "$"):
        _PlainBatchStatistics(4, **kwargs)


def test_a_cumulative_average_weighs_the_t_th_update_by_one_over_t() -> None:
    """``momentum=None``: the factor of update ``t`` is ``1/t`` (so the buffer is the plain mean), counted in
    training only; ``momentum=m``: ``m``; eval and untracked layers: 0 (no update, no count)."""
    layer = _PlainBatchStatistics(4, momentum=None)
    assert [layer._momentum_factor() for _ in range(3)] == [1.0, 1 / 2, 1 / 3]
    layer.eval()
    assert layer._momentum_factor() == 0.0 and int(layer.num_batches_tracked) == 3
    assert _PlainBatchStatistics(4, momentum=0.25)._momentum_factor() == 0.25
    assert _PlainBatchStatistics(4, track_running_stats=False)._momentum_factor() == 0.0


@pytest.mark.parametrize(
    "x, error, expected",
    [
        ([1.0, 2.0], TypeError, "BatchNorm expects a Tensor, got list."),
        (
            torch.zeros(4),
            ValueError,
            "BatchNorm expects input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); "
            "got 1D input of shape (4,).",
        ),
        (
            torch.zeros(1, 4, 1, 1, 1, 1),
            ValueError,
            "BatchNorm expects input of shape (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); "
            "got 6D input of shape (1, 4, 1, 1, 1, 1).",
        ),
        (
            torch.zeros(2, 3, 2, 2),
            ValueError,
            "BatchNorm was built with num_features=4 but the input has C=3 channels (shape (2, 3, 2, 2)).",
        ),
    ],
    ids=["not-a-tensor", "1d", "6d", "channels"],
)
def test_bad_input_is_refused_naming_the_layer_and_the_shape(x, error: type, expected: str) -> None:
    with pytest.raises(error, match="^" + re.escape(expected) + "$"):
        build_norm("bn", 4)(x)


class _PlainNorm(NormLayer):
    """A layer that keeps every default of the base."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)


def test_norm_layers_default_to_groupnorms_eps_and_an_affine() -> None:
    layer, native = _PlainNorm(4), torch.nn.GroupNorm(2, 4)
    assert (layer.eps, layer.affine) == (native.eps, native.affine)
    assert layer.weight.shape == layer.bias.shape == (4,) and _PlainNorm(4, affine=False).weight is None


@pytest.mark.parametrize(
    "num_features, eps, expected",
    [
        (True, 1e-5, "num_features must be a positive int, got True."),
        (0, 1e-5, "num_features must be a positive int, got 0."),
        (4.0, 1e-5, "num_features must be a positive int, got 4.0."),
        (4, 0, "eps must be a positive float, got 0."),
        (4, -1e-5, "eps must be a positive float, got -1e-05."),
        (4, "1e-5", "eps must be a positive float, got '1e-5'."),
    ],
    ids=["features-bool", "features-zero", "features-float", "eps-zero", "eps-negative", "eps-string"],
)
def test_bad_layer_settings_are_refused_naming_the_layer(num_features, eps, expected: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape("_PlainNorm: " + expected) + "$"):
        _PlainNorm(num_features, eps=eps)
