"""Monitor of batch statistics at the inputs of normalization layers (HN paper §4.6).

For each chosen layer with input ``x`` of shape ``(N, C, *spatial)`` (``S`` = product of
spatial sizes, 1 for ``(N, C)``), viewed as ``(N, C, S)`` in float32, the callback records:

- BN view, per channel ``c``:  ``bn_mean[c] = mean_{n,s} x[n,c,s]``,
  ``bn_std[c] = sqrt(mean_{n,s} (x[n,c,s] - bn_mean[c])^2)``  (biased, no eps: the
  statistic the layer itself normalizes with);
- EN view, over the whole layer: ``en_mean = mean_{n,c,s} x``, ``en_std`` likewise.

Fluctuation of a statistic = its standard deviation (``correction=0``) over the last
``window`` recorded samples (HN Figure 6 uses the last 200 steps). For the BN view it is
computed per channel and reported as the average over channels (histograms show the
per-channel values).

Cost: statistics are taken on one training batch out of every ``every_n_steps``, from a
forward pre-hook that detaches the input (no graph kept), reduces it to ``2C + 2`` floats
and keeps them on the CPU in a ring buffer of ``max_history`` samples per layer.
When a layer runs several forwards in one training batch (e.g. an adversarial attack
before the training forward), the **last** forward in training mode is the one recorded.
The step of a sample is ``trainer.global_step`` at the start of its batch (optimizer steps
taken before that forward); metrics are logged at that step.

Outputs:
- to every logger, per layer ``L``: ``norm_stats/L/{bn_mean,bn_std,en_mean,en_std}_fluct``
  and ``norm_stats/L/{en_mean,en_std}``; to loggers whose ``experiment`` has
  ``add_histogram`` (TensorBoard), histograms of the per-channel ``bn_mean``, ``bn_std``
  and their fluctuation;
- at the end of training, in ``output_dir`` (default: the trainer's ``log_dir``):
  ``norm_stats_summary.csv`` (one row per layer), ``norm_stats_history.csv`` (EN view and
  the BN view of ``plot_channels`` at every recorded step), ``norm_stats_evolution.png``
  (statistic vs step, HN Fig. 7) and ``norm_stats_fluctuation.png`` (HN Fig. 6), titled with
  the data module, the model and the epochs trained; the figures also go to TensorBoard loggers
  as images (``norm_stats/evolution``, ``norm_stats/fluctuation``).
"""

from __future__ import annotations

import csv
import os
import re
from collections import deque
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from normlightning import plotting
from normlightning.norms.model_walk import is_norm_layer

__all__ = ["NormStatistics", "input_statistics", "fluctuation", "run_title", "STATISTICS"]

#: Names of the recorded statistics, in storage order.
STATISTICS = ("bn_mean", "bn_std", "en_mean", "en_std")
#: Legend names of the statistics in the figures.
LEGEND = {"bn_mean": "BN view mean", "bn_std": "BN view std", "en_mean": "EN view mean", "en_std": "EN view std"}
#: What the two views are, printed under the figures.
VIEWS_NOTE = (
    "BN view: statistic of one channel over the batch and positions (bars: averaged over channels); "
    "EN view: statistic over the whole layer input (batch, channels and positions)"
)


def input_statistics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """BN-view and EN-view statistics of a layer input, detached, float32.

    Args:
        x: ``(N, C, *spatial)`` or ``(N, C)``.

    Returns:
        ``{"bn_mean": (C,), "bn_std": (C,), "en_mean": (), "en_std": ()}``, biased std.
    """
    if x.dim() < 2:
        raise ValueError(f"input_statistics: expected an input of shape (N, C, *spatial), got {tuple(x.shape)}")
    x = x.detach().float()
    flat = x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 1).reshape(x.shape[1], -1)  # (C, N*S)
    bn_std, bn_mean = torch.std_mean(flat, dim=1, correction=0)
    en_std, en_mean = torch.std_mean(flat, correction=0)
    return {"bn_mean": bn_mean, "bn_std": bn_std, "en_mean": en_mean, "en_std": en_std}


def fluctuation(values: torch.Tensor) -> torch.Tensor:
    """Std over the first axis (``correction=0``): ``(T, *shape) -> shape``; 0 when ``T == 1``."""
    return values.float().std(dim=0, correction=0)


class _History:
    """Ring buffer of recorded samples of one layer (CPU tensors)."""

    def __init__(self, maxlen: int) -> None:
        self.steps: deque[int] = deque(maxlen=maxlen)
        self.values: dict[str, deque[torch.Tensor]] = {k: deque(maxlen=maxlen) for k in STATISTICS}

    def append(self, step: int, stats: dict[str, torch.Tensor]) -> None:
        channels = stats["bn_mean"].numel()
        packed = torch.cat([stats["bn_mean"], stats["bn_std"], stats["en_mean"][None], stats["en_std"][None]]).cpu()
        self.steps.append(step)
        self.values["bn_mean"].append(packed[:channels])
        self.values["bn_std"].append(packed[channels : 2 * channels])
        self.values["en_mean"].append(packed[2 * channels])
        self.values["en_std"].append(packed[2 * channels + 1])

    def __len__(self) -> int:
        return len(self.steps)

    def stacked(self, name: str, last: int | None = None) -> torch.Tensor:
        """``(T, C)`` for BN statistics, ``(T,)`` for EN statistics (the last ``last`` samples)."""
        values = list(self.values[name])
        if last is not None:
            values = values[-last:]
        return torch.stack(values)

    def state(self) -> dict[str, Any]:
        return {"steps": list(self.steps), **{k: list(v) for k, v in self.values.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.steps.extend(state["steps"])
        for k in STATISTICS:
            self.values[k].extend(state[k])


def run_title(trainer: Trainer, pl_module: LightningModule) -> str:
    """``"Digits, small_cnn, 3 epochs (51 steps)"``: the data module, the model (the task's
    ``backbone`` hyperparameter, else its class) and the training done so far."""
    datamodule = getattr(trainer, "datamodule", None)
    data = type(datamodule).__name__ if datamodule is not None else "no DataModule"
    model = getattr(pl_module, "hparams", {}).get("backbone") or type(pl_module).__name__
    epochs = trainer.current_epoch
    return f"{data}, {model}, {epochs} epoch{'s' if epochs != 1 else ''} ({trainer.global_step} steps)"


class NormStatistics(Callback):
    """Record and log the fluctuation of batch statistics at normalization-layer inputs.

    Args:
        layers: regular expression (``re.search``) on qualified module names, e.g.
            ``r"backbone\\.layer1"``; default: every normalization layer (see
            :func:`is_norm_layer`). Layers nested inside a selected one are left out.
        every_n_steps: record one training batch out of every ``every_n_steps``
            (counted in training batches; equals optimizer steps without accumulation).
        window: number of recorded samples over which the fluctuation is computed.
        max_history: samples kept per layer (ring buffer; bounds memory to
            ``max_history * (2C + 2)`` floats per layer).
        plot_channels: BN-view channels drawn in the evolution figure and history CSV.
        histogram_every_n_samples: log histograms every this many recorded samples.
        output_dir: where the CSV/PNG files go; default ``trainer.log_dir`` (or
            ``trainer.default_root_dir`` without a logger).
        plot: write the PNG figures (needs matplotlib: ``pip install normlightning[plots]``).

    After training, :attr:`summary` holds the rows of the summary table and
    :attr:`output_files` the paths written.
    """

    def __init__(
        self,
        layers: str | None = None,
        every_n_steps: int = 10,
        window: int = 100,
        max_history: int = 1000,
        plot_channels: list[int] | None = None,
        histogram_every_n_samples: int = 10,
        output_dir: str | None = None,
        plot: bool = True,
    ) -> None:
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("window", window),
            ("max_history", max_history),
            ("histogram_every_n_samples", histogram_every_n_samples),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"NormStatistics: {name} must be a positive int, got {value!r}")
        if window < 2:
            raise ValueError(f"NormStatistics: window must be >= 2 to measure a fluctuation, got {window}")
        if window > max_history:
            raise ValueError(f"NormStatistics: window ({window}) must not exceed max_history ({max_history})")
        try:
            self.pattern = re.compile(layers) if layers is not None else None
        except re.error as err:
            raise ValueError(f"NormStatistics: layers={layers!r} is not a valid regular expression: {err}") from err
        if plot:
            plotting.require_matplotlib()  # fail before training, not after it
        self.layers = layers
        self.every_n_steps = every_n_steps
        self.window = window
        self.max_history = max_history
        self.plot_channels = list(plot_channels) if plot_channels is not None else [0]
        self.histogram_every_n_samples = histogram_every_n_samples
        self.output_dir = output_dir
        self.plot = plot
        self.history: dict[str, _History] = {}
        self.summary: list[dict[str, Any]] = []
        self.output_files: list[str] = []
        self._batches_seen = 0
        self._samples = 0
        self._armed = False
        self._step = 0
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    @property
    @override
    def state_key(self) -> str:
        """The class name and the settings that tell two instances apart (Lightning's own format)."""
        return f"{type(self).__qualname__}{dict(layers=self.layers, every_n_steps=self.every_n_steps)!r}"

    # layer selection / hooks ----------------------------------------------------------
    def select_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: layer}`` of the monitored layers; ``ValueError`` when none matches."""
        chosen: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if not is_norm_layer(module) or any(name.startswith(p + ".") for p in chosen):
                continue
            if self.pattern is None or self.pattern.search(name):
                chosen[name] = module
        if not chosen:
            names = [n for n, m in model.named_modules() if is_norm_layer(m)]
            raise ValueError(
                f"NormStatistics: no normalization layer matches layers={self.layers!r}; "
                f"normalization layers in the model: {names[:20]}{' ...' if len(names) > 20 else ''}"
            )
        return chosen

    def attach(self, model: nn.Module) -> None:
        """Register the forward pre-hooks on the selected layers of ``model``."""
        self.detach()
        for name, layer in self.select_layers(model).items():
            self.history.setdefault(name, _History(self.max_history))
            self._handles.append(layer.register_forward_pre_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._armed and module.training and args and isinstance(args[0], torch.Tensor):
                self._pending[name] = input_statistics(args[0])

        return hook

    # lightning hooks ------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.attach(pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._armed = self._batches_seen % self.every_n_steps == 0
        self._step = trainer.global_step  # optimizer steps taken before this batch's forward
        self._pending = {}

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches_seen += 1
        if not self._armed:
            return
        self._armed = False
        step = self._step
        for name, stats in self._pending.items():
            self.history[name].append(step, stats)
        self._pending = {}
        self._samples += 1
        self._log(trainer, step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.detach()
        if trainer.is_global_zero:
            self.write_outputs(
                self.output_dir or trainer.log_dir or trainer.default_root_dir, run_title(trainer, pl_module)
            )
            self._log_figures(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.detach()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_seen": self._batches_seen,
            "samples": self._samples,
            "history": {name: h.state() for name, h in self.history.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches_seen = int(state_dict.get("batches_seen", 0))
        self._samples = int(state_dict.get("samples", 0))
        self.history = {}
        for name, state in state_dict.get("history", {}).items():
            self.history[name] = _History(self.max_history)
            self.history[name].load(state)

    # measurements ---------------------------------------------------------------------
    def fluctuations(self, name: str) -> dict[str, torch.Tensor]:
        """Per-statistic fluctuation of layer ``name`` over the last ``window`` samples:
        ``(C,)`` for ``bn_*``, ``()`` for ``en_*``."""
        history = self.history[name]
        return {k: fluctuation(history.stacked(k, self.window)) for k in STATISTICS}

    def _log(self, trainer: Trainer, step: int) -> None:
        histograms = self._samples % self.histogram_every_n_samples == 0
        metrics: dict[str, float] = {}
        for name, history in self.history.items():
            if len(history) == 0:
                continue
            prefix = f"norm_stats/{name}"
            metrics[f"{prefix}/en_mean"] = float(history.values["en_mean"][-1])
            metrics[f"{prefix}/en_std"] = float(history.values["en_std"][-1])
            fluct = self.fluctuations(name) if len(history) >= 2 else None
            if fluct is not None:
                metrics.update({f"{prefix}/{k}_fluct": float(v.mean()) for k, v in fluct.items()})
            if histograms and trainer.is_global_zero:
                tensors = {"bn_mean": history.values["bn_mean"][-1], "bn_std": history.values["bn_std"][-1]}
                if fluct is not None:
                    tensors.update({"bn_mean_fluct": fluct["bn_mean"], "bn_std_fluct": fluct["bn_std"]})
                for logger in trainer.loggers:
                    add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
                    if callable(add_histogram):
                        for key, tensor in tensors.items():
                            add_histogram(f"{prefix}/{key}", tensor, step)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per layer: sample counts, fluctuations (BN view averaged over channels)
        and average statistics over the last ``window`` samples."""
        rows = []
        for name, history in self.history.items():
            if len(history) == 0:
                continue
            fluct = self.fluctuations(name)
            row: dict[str, Any] = {
                "layer": name,
                "num_channels": int(history.values["bn_mean"][-1].numel()),
                "num_samples": len(history),
                "first_step": history.steps[0],
                "last_step": history.steps[-1],
                "window_samples": min(self.window, len(history)),
            }
            row.update({f"{k}_fluct": float(v.mean()) for k, v in fluct.items()})
            row.update({f"{k}_avg": float(history.stacked(k, self.window).mean()) for k in STATISTICS})
            rows.append(row)
        return rows

    def write_outputs(self, directory: str, run: str | None = None) -> list[str]:
        """Write the CSV tables and (if ``plot``) the PNG figures into ``directory``; ``run``
        (e.g. :func:`run_title`) starts the figures' titles."""
        self.summary = self.summary_rows()
        if not self.summary:
            return []
        os.makedirs(directory, exist_ok=True)
        files = [self._write_csv(os.path.join(directory, "norm_stats_summary.csv"), self.summary)]
        files.append(self._write_csv(os.path.join(directory, "norm_stats_history.csv"), self._history_rows()))
        if self.plot:
            prefix = f"{run}: " if run else ""
            files.append(self._plot_evolution(os.path.join(directory, "norm_stats_evolution.png"), prefix))
            files.append(
                plotting.plot_fluctuation(
                    {r["layer"]: {LEGEND[k]: r[f"{k}_fluct"] for k in STATISTICS} for r in self.summary},
                    os.path.join(directory, "norm_stats_fluctuation.png"),
                    title=f"{prefix}fluctuation of the batch statistics at normalization-layer inputs",
                    ylabel=f"std over the last {max(r['window_samples'] for r in self.summary)} recorded steps\n"
                    + ("(every step)" if self.every_n_steps == 1 else f"(one every {self.every_n_steps} steps)"),
                    note=VIEWS_NOTE,
                )
            )
        self.output_files = files
        return files

    def _log_figures(self, trainer: Trainer) -> None:
        """Log the written PNG figures to the TensorBoard loggers as images."""
        figures = [f for f in self.output_files if f.endswith(".png")]
        for logger in trainer.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if not callable(add_image):
                continue
            for path in figures:
                tag = "norm_stats/" + os.path.basename(path)[len("norm_stats_") : -len(".png")]
                add_image(tag, plotting.read_png(path), trainer.global_step, dataformats="HWC")

    def _history_rows(self) -> list[dict[str, Any]]:
        columns = [f"{k}_c{c}" for c in self.plot_channels for k in ("bn_mean", "bn_std")]
        rows = []
        for name, history in self.history.items():
            for i, step in enumerate(history.steps):
                row: dict[str, Any] = {"step": step, "layer": name}
                row["en_mean"] = float(history.values["en_mean"][i])
                row["en_std"] = float(history.values["en_std"][i])
                for col in columns:
                    row[col] = ""
                for c in self.plot_channels:
                    if c < history.values["bn_mean"][i].numel():
                        row[f"bn_mean_c{c}"] = float(history.values["bn_mean"][i][c])
                        row[f"bn_std_c{c}"] = float(history.values["bn_std"][i][c])
                rows.append(row)
        return rows

    def _plot_evolution(self, path: str, prefix: str = "") -> str:
        steps, series = {}, {}
        for name, history in self.history.items():
            if len(history) == 0:
                continue
            steps[name] = list(history.steps)
            layer_series: dict[str, dict[str, list[float]]] = {"mean": {}, "std": {}}
            for stat in ("mean", "std"):
                bn = history.stacked(f"bn_{stat}")
                for c in self.plot_channels:
                    if c < bn.shape[1]:
                        layer_series[stat][f"BN view, channel {c}"] = bn[:, c].tolist()
                layer_series[stat]["EN view (whole layer)"] = history.stacked(f"en_{stat}").tolist()
            series[name] = layer_series
        return plotting.plot_statistics_evolution(
            steps,
            series,
            path,
            title=f"{prefix}batch statistics at normalization-layer inputs vs training step",
            note=VIEWS_NOTE,
        )

    @staticmethod
    def _write_csv(path: str, rows: list[dict[str, Any]]) -> str:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path
