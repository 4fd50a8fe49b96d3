"""Layers whose inference statistics are constants per channel (bn, brn, ghost, bgn with whole-channel
groups, gbgn without example weighing, hn with batch sets only) run native eval batch norm with them,
kept between calls: every change of the running statistics made by PyTorch ops shows in the next
output, a write that bypasses version counters shows after ``eval()``, and an output computed
under ``inference_mode`` must not stop a later eval forward with gradients (a PGD attack after
validation)."""

from __future__ import annotations

import pytest
import torch

from normlightning.norms import build_norm

SPECS = {
    "bn": {},
    "brn": {},
    "ghost": {"num_groups": 2},
    "bgn": {"num_groups": 2},
    "gbgn": {"channel_groups": 2},
    "hn": {"mean": "en:2", "std": "en:1"},
}


def _trained(name: str, shift: float):
    layer = build_norm(name, 4, **SPECS[name])
    layer(torch.randn(6, 4, 3, 3) * 2 + shift)
    return layer.eval()


def _reference(name: str, layer, x):
    """The eval output of a new ``name`` layer given ``layer``'s parameters and buffers, in ``x``'s dtype."""
    twin = build_norm(name, 4, **SPECS[name])
    twin.load_state_dict(layer.state_dict())
    return twin.to(x.dtype).eval()(x)


def _running_buffer(layer):
    return next(b for n, b in layer.named_buffers() if n in ("running_mean", "moving_x"))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eval_follows_every_change_of_the_running_statistics(name):
    torch.manual_seed(0)
    layer = _trained(name, 1.0)
    x = torch.randn(3, 4, 3, 3)
    first = layer(x)
    layer.train()(torch.randn(6, 4, 3, 3) * 3 - 1)  # a training step updates the running statistics
    layer.eval()
    after_step = layer(x)
    assert not torch.allclose(after_step, first)
    torch.testing.assert_close(after_step, _reference(name, layer, x))
    other = _trained(name, 5.0)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
    with torch.no_grad():
        _running_buffer(layer).add_(0.5)
    torch.testing.assert_close(layer(x), _reference(name, layer, x))
    before = layer(x)
    _running_buffer(layer).data.add_(0.5)  # no version bump (as dist.broadcast / all_reduce): shows after eval()
    changed = layer.eval()(x)
    assert not torch.allclose(changed, before)
    torch.testing.assert_close(changed, _reference(name, layer, x))
    layer.double()
    torch.testing.assert_close(layer(x.double()), _reference(name, layer, x.double()))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_statistics_are_built_once_until_a_source_buffer_changes(name):
    """The kept statistics are reused: eval forwards build them once, and again only after a change."""
    layer = _trained(name, 1.0)
    built = []
    build = layer._channel_statistics
    layer._channel_statistics = lambda: built.append(1) or build()
    x = torch.randn(3, 4, 3, 3)
    first = layer(x)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)
    assert len(built) == 1
    with torch.no_grad():
        _running_buffer(layer).add_(0.5)
    layer(x)
    layer(x)
    assert len(built) == 2


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eval_after_inference_mode_still_gives_input_gradients(name):
    torch.manual_seed(0)
    layer = _trained(name, 1.0)
    x = torch.randn(3, 4, 3, 3)
    with torch.inference_mode():
        layer(x)
    x_adv = x.clone().requires_grad_(True)
    layer(x_adv).square().sum().backward()
    assert x_adv.grad is not None and torch.isfinite(x_adv.grad).all()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_float32_layer_in_eval_takes_float64_input(name):
    torch.manual_seed(0)
    layer = _trained(name, 1.0)
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _reference(name, layer, x))


#: Configurations of every layer with ``inference_channel_statistics()``, with and without constants per channel.
PREDICATE_CASES = [
    ("bn", {}, True),
    ("bn", {"alpha": 0.5}, False),
    ("bn", {"track_running_stats": False}, False),
    ("brn", {}, True),
    ("ghost", {"num_groups": 2}, True),
    ("ghost", {"num_groups": 2, "alpha": 0.5}, False),
    ("bgn", {"num_groups": 2}, True),
    ("bgn", {"num_groups": 12}, False),  # groups split channels (D = 36)
    ("gbgn", {"channel_groups": 2}, True),
    ("gbgn", {"channel_groups": 2, "alpha": 0.5}, False),
    ("hn", {"mean": "bn", "std": "en:2"}, True),
    ("hn", {"mean": "bn", "std": "bn+en:1"}, True),  # constants, but the mixture weights take gradients
    ("hn", {"mean": "in", "std": "en:1"}, False),
]


@pytest.mark.parametrize("name,spec,constant", PREDICATE_CASES, ids=[f"{n}-{s}" for n, s, _ in PREDICATE_CASES])
def test_one_predicate_decides_eval_forward_and_channel_statistics(name, spec, constant):
    """``inference_channel_statistics()`` returns exactly when the layer's one predicate says its
    statistics are constants per channel; then the eval output is the native eval-mode batch norm with
    them (the formula ``gamma (x - mean) / sqrt(var + eps) + beta`` written out), and the eval forward
    takes that path unless a parameter of the statistics needs a gradient (hn's std mixture)."""
    torch.manual_seed(0)
    layer = build_norm(name, 4, **spec)
    layer(torch.randn(6, 4, 3, 3) * 2 + 1)
    layer.eval()
    x = torch.randn(3, 4, 3, 3)
    assert (layer._channel_statistics_obstacle() is None) is constant
    if not constant:
        with pytest.raises(ValueError, match="alpha|track_running_stats|split channels|per example"):
            layer.inference_channel_statistics()
        assert not layer._evaluates_by_channel()
        return
    mean, var = layer.inference_channel_statistics()
    view = (1, -1, 1, 1)
    expected = (x - mean.view(view)) / torch.sqrt(var.view(view) + layer.eps) * layer.weight.view(view)
    torch.testing.assert_close(layer(x), expected + layer.bias.view(view))
    assert layer._evaluates_by_channel() is (getattr(layer, "std_weight", None) is None)
