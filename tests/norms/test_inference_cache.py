"""Layers whose inference statistics are constants per channel (bgn with whole-channel groups,
gbgn without example weighing, hn with batch sets only) keep them between eval calls: any change
of the running statistics must still show in the next output."""

from __future__ import annotations

import copy

import pytest
import torch

from normlightning.norms import build_norm

SPECS = {"bgn": {"num_groups": 2}, "gbgn": {"channel_groups": 2}, "hn": {"mean": "en:2", "std": "en:1"}}


def _fresh_output(layer, x):
    """The eval output of an uncached copy of ``layer`` (same parameters and buffers)."""
    twin = copy.deepcopy(layer)
    twin.__dict__.pop("_channel_statistics_cache", None)
    return twin(x)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_eval_follows_every_change_of_the_running_statistics(name):
    torch.manual_seed(0)
    layer = build_norm(name, 4, **SPECS[name])
    layer(torch.randn(6, 4, 3, 3) * 2 + 1)
    layer.eval()
    x = torch.randn(3, 4, 3, 3)
    first = layer(x)
    assert torch.equal(layer(x), first)  # a cached second call
    layer.train()(torch.randn(6, 4, 3, 3) * 3 - 1)  # a training step updates the running statistics
    layer.eval()
    after_step = layer(x)
    assert not torch.allclose(after_step, first)
    torch.testing.assert_close(after_step, _fresh_output(layer, x))
    other = build_norm(name, 4, **SPECS[name])
    other(torch.randn(6, 4, 3, 3) + 5)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other.eval()(x))
    with torch.no_grad():
        next(b for n, b in layer.named_buffers() if n in ("running_mean", "moving_x")).add_(0.5)
    torch.testing.assert_close(layer(x), _fresh_output(layer, x))
    layer.double()
    torch.testing.assert_close(layer(x.double()), _fresh_output(layer, x.double()))
