"""Which modules count as norm layers, and the statistics modes used by the attack and few-shot tasks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.norms import build_norm
from normlightning.norms.model_walk import is_batch_statistic_layer, is_norm_layer, statistics_mode


def test_layer_kinds() -> None:
    assert all(
        is_norm_layer(m)
        for m in (nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), build_norm("gn", 4, num_groups=2))
    )
    assert not any(is_norm_layer(m) for m in (nn.Conv2d(4, 4, 1), nn.Dropout(), nn.ReLU()))
    assert is_batch_statistic_layer(nn.BatchNorm2d(4)) and is_batch_statistic_layer(build_norm("bgn", 4, num_groups=2))
    assert not is_batch_statistic_layer(nn.BatchNorm2d(4, track_running_stats=False))
    assert not any(is_batch_statistic_layer(build_norm(n, 4)) for n in ("ln", "in", "pn"))


def _warm(model: nn.Module) -> nn.Module:
    model.train()
    for _ in range(2):
        model(torch.randn(6, 4, 3, 3) + 1)
    return model.eval()


def test_train_frozen_normalizes_with_the_batch_and_restores_buffers_and_sync() -> None:
    model = _warm(nn.Sequential(nn.BatchNorm2d(4), build_norm("bn", 4), nn.Dropout(0.5)))
    model[1].sync_statistics = True  # left as the user set it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4, 3, 3) * 2
    with torch.no_grad(), statistics_mode(model, "train_frozen", sync=False) as switched:
        assert switched == 2 and not model[1].sync_statistics and not model[2].training
        by_hand = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
        )
        torch.testing.assert_close(model[0](x), by_hand)
        torch.testing.assert_close(model[1](x), by_hand)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model[1].sync_statistics and not any(m.training for m in model.modules())


def test_train_updates_running_buffers_and_eval_uses_them() -> None:
    model = _warm(nn.Sequential(nn.BatchNorm2d(4)))
    x = torch.randn(5, 4, 3, 3)
    mean0 = model[0].running_mean.clone()
    with torch.no_grad(), statistics_mode(model, "train"):
        model(x)
    torch.testing.assert_close(model[0].running_mean, 0.9 * mean0 + 0.1 * x.mean((0, 2, 3)))
    model.train()
    with torch.no_grad(), statistics_mode(model, "eval"):
        out = model(x)
    expected = (x - model[0].running_mean.view(1, -1, 1, 1)) / torch.sqrt(model[0].running_var.view(1, -1, 1, 1) + 1e-5)
    torch.testing.assert_close(out, expected)
    assert model[0].training


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="train_frozen"):
        with statistics_mode(nn.BatchNorm1d(2), "frozen"):
            pass
