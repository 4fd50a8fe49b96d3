"""Tests of the example-weighing search: picks the best alpha on a constructed case."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.callbacks.example_weighing import (
    DEFAULT_ALPHAS,
    ExampleWeighingSearch,
    example_weighing_grid,
    search_example_weighing,
    set_example_weighing_alpha,
)

BEST = 1.0 / 64


class PeakedLayer(nn.Module):
    """Mock example-weighing layer: logits ``[x0 - 50 * |alpha - 1/64|, 0]``.

    With label 0 and margins ``x0 = i/100``, accuracy(alpha) = #{i: i/100 > 50|alpha - 1/64|} / n,
    maximal (= 1) exactly at alpha = 1/64.
    """

    supports_example_weighing = True

    def __init__(self) -> None:
        super().__init__()
        self.alpha = 0.0
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = 50.0 * abs(self.alpha - BEST)
        return torch.stack([x[:, 0] * self.scale - shift, torch.zeros_like(x[:, 0])], dim=1)


def _val_data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    margins = torch.arange(1, n + 1, dtype=torch.float32) / 100
    return torch.stack([margins, torch.zeros(n)], dim=1), torch.zeros(n, dtype=torch.long)


def _expected_accuracy(alpha: float, x: torch.Tensor) -> float:
    return (x[:, 0] > 50.0 * abs(alpha - BEST)).float().mean().item()


def test_default_grid():
    assert DEFAULT_ALPHAS == (0.0, 1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
    assert example_weighing_grid() == list(DEFAULT_ALPHAS)
    assert example_weighing_grid(10) == sorted(set(DEFAULT_ALPHAS) | {0.05, 0.1, 0.2})
    assert example_weighing_grid(1) == list(DEFAULT_ALPHAS) + [1.0]  # 1/B, 2/B clipped to 1
    with pytest.raises(ValueError, match="batch_size"):
        example_weighing_grid(0)


def test_search_picks_the_constructed_best_and_sets_it():
    x, y = _val_data()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.other = PeakedLayer(), PeakedLayer()  # `other` is unused in forward

        def forward(self, x):
            return self.first(x)

    model = Model()
    result = search_example_weighing(model, DataLoader(TensorDataset(x, y), batch_size=32), batch_size=100)
    assert result.alphas == example_weighing_grid(100)
    assert len(result.table()) == len(result.alphas)
    for row in result.table():
        assert row["accuracy"] == pytest.approx(_expected_accuracy(row["alpha"], x))
    assert result.best_alpha == BEST and result.best_accuracy == 1.0
    assert model.first.alpha == BEST and model.other.alpha == BEST  # one shared alpha
    assert result.layers == ["first", "other"]
    assert "| 0.015625 * |" in result.to_markdown()


def test_ties_go_to_smallest_alpha_and_errors():
    class Flat(PeakedLayer):
        def forward(self, x):
            return torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], dim=1)

    x, y = _val_data(10)
    model = nn.Sequential(Flat())
    result = search_example_weighing(model, [(x, y)], alphas=[0.5, 0.25, 0.0])
    assert result.alphas == [0.0, 0.25, 0.5] and result.best_alpha == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        search_example_weighing(model, [(x, y)], alphas=[1.5])
    with pytest.raises(ValueError, match="supports_example_weighing"):
        search_example_weighing(nn.Sequential(nn.BatchNorm1d(2)), [(x, y)])
    with pytest.raises(ValueError, match="no example-weighing layer named"):
        set_example_weighing_alpha(model, {"nope": 0.1})


class _Task(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = PeakedLayer()

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1]) * 0.0

    def validation_step(self, batch, batch_idx):
        pass

    def test_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, callback) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )


def test_callback_searches_after_fit_and_restores_from_checkpoint(tmp_path, monkeypatch):
    x, y = _val_data()
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    cb = ExampleWeighingSearch()
    task = _Task()
    _trainer(tmp_path, cb).fit(task, loader, loader)
    assert cb.alpha == BEST and task.layer.alpha == BEST
    assert len(cb.table) == len(DEFAULT_ALPHAS)
    ckpt = torch.load(cb.checkpoint_path, weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "ExampleWeighingSearch" in str(k))
    assert state["alpha"] == BEST

    # test from the checkpoint on a fresh model: alpha restored, no new search
    fresh_cb, fresh = ExampleWeighingSearch(), _Task()
    monkeypatch.setattr(ExampleWeighingSearch, "search", lambda *a: pytest.fail("must not search again"))
    _trainer(tmp_path, fresh_cb).test(fresh, loader, ckpt_path=cb.checkpoint_path)
    assert fresh.layer.alpha == BEST and fresh_cb.table == cb.table


def test_callback_searches_before_test_without_checkpoint(tmp_path):
    x, y = _val_data()

    class Data(LightningDataModule):
        def val_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=50)

        def test_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=50)

    cb, task = ExampleWeighingSearch(alphas=[0.0, BEST, 0.5]), _Task()
    _trainer(tmp_path, cb).test(task, datamodule=Data())
    assert task.layer.alpha == BEST
    assert [r["alpha"] for r in cb.table] == [0.0, BEST, 0.5]


# ------------------------------------------------------------------ normlightning layers
class _ThresholdHead(nn.Module):
    """logits = [mean over (C, S) of the norm output, 5]: class 0 iff the mean exceeds 5."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        z = self.norm(x).mean(dim=(1, 2, 3))
        return torch.stack([z, torch.full_like(z, 5.0)], dim=1)


@pytest.mark.parametrize("name", ["bn", "ghost", "gbgn"])
def test_search_on_normlightning_layers(name):
    """Fresh population stats (mean 0, var 1), inputs constant over space (x = m): with
    Four Things' mixing, mu = a*m, var = (1-a)(1 + a*m^2), so the normalized value is
    f(m, a) = m*sqrt(1-a)/sqrt(1 + a*m^2) and f < 5 iff a > (m^2 - 25) / (26 m^2).
    m = 6 (label 1) needs a > 0.01175, m = 10 (label 0) needs a < 0.0288:
    of the default grid only a = 1/64 classifies both."""
    from normlightning.norms import build_norm

    kwargs = {"ghost": {"num_groups": 2}}.get(name, {})
    model = _ThresholdHead(build_norm(name, 1, **kwargs))
    m = torch.tensor([6.0, 6.0, 10.0, 10.0])
    x, y = m.view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous(), torch.tensor([1, 1, 0, 0])

    def f(a: float) -> torch.Tensor:
        return m * (1 - a) ** 0.5 / (1 + a * m**2) ** 0.5

    result = search_example_weighing(model, [(x, y)])
    assert result.alphas == list(DEFAULT_ALPHAS)
    for row in result.table():
        predicted = (f(row["alpha"]) <= 5.0).long()  # class 1 when logit 0 does not exceed 5
        assert row["accuracy"] == pytest.approx((predicted == y).float().mean().item()), row
    assert result.best_alpha == BEST and result.best_accuracy == 1.0
    assert model.norm.alpha == BEST
    assert sorted(acc for acc in result.accuracies)[-2] == 0.5  # every other alpha is clearly worse
