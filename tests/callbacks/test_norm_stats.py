"""Tests of the NormStatistics callback: recorded statistics vs hand-computed ones."""

from __future__ import annotations

import csv
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning import plotting
from normlightning.callbacks.norm_stats import NormStatistics, input_statistics


class _Experiment:
    def __init__(self) -> None:
        self.histograms: list[tuple[str, torch.Tensor, int]] = []

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.histograms.append((tag, values.clone(), step))


class RecordingLogger(Logger):
    """Keeps every logged metric and histogram in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self._experiment = _Experiment()

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> _Experiment:
        return self._experiment

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class TinyNet(LightningModule):
    """BatchNorm2d directly on the data, so its input is exactly the batch fed."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2), nn.BatchNorm1d(2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(num_batches: int = 12, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(num_batches * batch, 3, 2, 2, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    return x, torch.randint(0, 2, (num_batches * batch,), generator=g)


def _hand_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    per_channel = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)  # (C, N*H*W)
    m = per_channel.mean(dim=1)
    s = ((per_channel - m[:, None]) ** 2).mean(dim=1).sqrt()
    em = x.mean()
    es = ((x - em) ** 2).mean().sqrt()
    return {"bn_mean": m, "bn_std": s, "en_mean": em, "en_std": es}


def _fit(tmp_path, callback, num_batches=12, batch=4):
    x, y = _data(num_batches, batch)
    logger = RecordingLogger()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(TinyNet(), DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False))
    return x, logger


def test_input_statistics_match_hand_formula():
    x = torch.randn(5, 3, 4, 2)
    got, want = input_statistics(x), _hand_stats(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    flat = torch.randn(6, 4)  # (N, C): S = 1, BN view over N only
    got = input_statistics(flat)
    torch.testing.assert_close(got["bn_mean"], flat.mean(0))
    torch.testing.assert_close(got["bn_std"], flat.std(0, unbiased=False))


def test_trainer_records_every_k_steps_and_writes_outputs(tmp_path):
    cb = NormStatistics(every_n_steps=3, window=3, histogram_every_n_samples=2, output_dir=str(tmp_path / "out"))
    x, logger = _fit(tmp_path, cb)
    assert set(cb.history) == {"net.0", "net.3"}
    hist = cb.history["net.0"]
    # 12 batches, one optimizer step each: sampled batches 0, 3, 6, 9 at global steps 0, 3, 6, 9
    assert list(hist.steps) == [0, 3, 6, 9]
    for i, step in enumerate(hist.steps):
        want = _hand_stats(x[4 * step : 4 * step + 4])
        for k in want:
            torch.testing.assert_close(hist.values[k][i], want[k])
    # fluctuation over the last 3 samples, logged at step 9: population std, channel-averaged
    last3 = torch.stack([_hand_stats(x[4 * s : 4 * s + 4])["bn_std"] for s in (3, 6, 9)])
    want_fluct = ((last3 - last3.mean(0)) ** 2).mean(0).sqrt().mean()
    logged = dict(logger.metrics)[9]
    assert math.isclose(logged["norm_stats/net.0/bn_std_fluct"], float(want_fluct), rel_tol=1e-5)
    assert "norm_stats/net.3/en_mean_fluct" in logged
    assert [s for s, _ in logger.metrics] == [0, 3, 6, 9]
    # histograms every 2nd sample (samples #2 and #4 -> steps 3 and 9)
    assert sorted({step for _, _, step in logger.experiment.histograms}) == [3, 9]
    # outputs
    out = tmp_path / "out"
    for name in ("norm_stats_summary.csv", "norm_stats_history.csv"):
        assert (out / name).is_file()
    for name in ("norm_stats_evolution.png", "norm_stats_fluctuation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "norm_stats_summary.csv")))
    assert [r["layer"] for r in rows] == ["net.0", "net.3"]
    assert int(rows[0]["num_samples"]) == 4 and int(rows[0]["num_channels"]) == 3
    assert math.isclose(float(rows[0]["bn_std_fluct"]), float(want_fluct), rel_tol=1e-5)
    history_rows = list(csv.DictReader(open(out / "norm_stats_history.csv")))
    assert len(history_rows) == 8  # 4 samples x 2 layers
    assert not cb._handles  # hooks removed after training


def test_fluctuation_label_names_the_steps_really_recorded(tmp_path, monkeypatch):
    """A window of 100 over a run that recorded 4 samples: the figure's label says 4, not 100."""
    labels = []
    real = plotting.plot_fluctuation
    monkeypatch.setattr(plotting, "plot_fluctuation", lambda *a, **k: labels.append(k["ylabel"]) or real(*a, **k))
    cb = NormStatistics(every_n_steps=3, window=100, output_dir=str(tmp_path / "out"))
    _fit(tmp_path, cb)
    assert len(cb.history["net.0"]) == 4
    assert labels == ["std over the last 4 recorded steps\n(one every 3 steps)"]


def test_layer_regex_and_bad_settings():
    model = TinyNet()
    assert list(NormStatistics(layers=r"net\.3$", plot=False).select_layers(model)) == ["net.3"]
    with pytest.raises(ValueError, match="no normalization layer matches"):
        NormStatistics(layers="nothing_here", plot=False).select_layers(model)
    with pytest.raises(ValueError, match="every_n_steps"):
        NormStatistics(every_n_steps=0, plot=False)
    with pytest.raises(ValueError, match="regular expression"):
        NormStatistics(layers="(", plot=False)


def test_last_training_forward_of_a_batch_is_recorded_eval_ignored():
    model = nn.Sequential(nn.BatchNorm1d(2))
    cb = NormStatistics(every_n_steps=1, window=2, plot=False)
    cb.attach(model)
    trainer = SimpleNamespace(global_step=7, loggers=[], is_global_zero=True)
    first, second, evaluated = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2) + 5
    cb.on_train_batch_start(trainer, None, None, 0)
    model.train()
    model(first)
    model(second)
    model.eval()
    model(evaluated)
    cb.on_train_batch_end(trainer, None, None, None, 0)
    torch.testing.assert_close(cb.history["0"].values["bn_mean"][0], second.mean(0))
    assert list(cb.history["0"].steps) == [7]
    cb.detach()


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install normlightning\[plots\]"):
        plotting.require_matplotlib()
    with pytest.raises(ImportError, match=r"normlightning\[plots\]"):
        NormStatistics(plot=True)
    NormStatistics(plot=False)  # usable without the figures


class OurNormNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        from normlightning.norms import build_norm

        self.net = nn.Sequential(
            build_norm("ghost", 3, num_groups=2), nn.Flatten(), nn.Linear(12, 2), build_norm("ln", 2)
        )


def test_normlightning_layers_and_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    x, y = _data(4, 4)
    cb = NormStatistics(every_n_steps=2, window=2, histogram_every_n_samples=1)
    model = OurNormNet()
    assert list(cb.select_layers(model)) == ["net.0", "net.3"]
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False))
    assert list(cb.history["net.0"].steps) == [0, 2]
    torch.testing.assert_close(cb.history["net.0"].values["bn_std"][1], _hand_stats(x[8:12])["bn_std"])
    log_dir = tmp_path / "tb" / "version_0"
    assert (log_dir / "norm_stats_summary.csv").is_file() and (log_dir / "norm_stats_evolution.png").is_file()
    (events,) = log_dir.glob("events.out.tfevents.*")
    # the figures also go to TensorBoard, as images of the PNGs' size
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["images"]) == ["norm_stats/evolution", "norm_stats/fluctuation"]
    from PIL import Image

    image = accumulator.Images("norm_stats/fluctuation")[-1]
    assert (image.width, image.height) == Image.open(log_dir / "norm_stats_fluctuation.png").size
