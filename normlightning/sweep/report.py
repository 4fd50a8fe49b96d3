"""The report of a batch-size sweep, from the cells' ``result.json`` files: ``results.csv``
(one row per finished cell), the mean and sample std over seeds (:func:`aggregate`), a
markdown table (``table.md``) and accuracy against batch size, one panel per method on a shared y-axis
(``accuracy_vs_batch.png``, :func:`sweep_figure`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from normlightning import plotting
from normlightning.sweep.grid import RESULT_FILE, RESULT_METRICS, Cell, method_preset

__all__ = [
    "aggregate",
    "collect_rows",
    "markdown_table",
    "method_label",
    "plot_sweep",
    "sweep_figure",
    "sweep_title",
    "write_report",
]

#: Colours of the methods' lines: matplotlib's default cycle without its grey (C7), the reference line's colour.
COLOURS = tuple(f"C{i}" for i in range(10) if i != 7)

#: Statistics of one metric: ``{method: {batch_size: (mean, std, n)}}``.
Stats = Mapping[str, Mapping[int, tuple[float, float, int]]]


def collect_rows(out_dir: str | os.PathLike, grid: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell of ``grid``: method, batch_size, seed, lr, wall_s and metrics."""
    rows = []
    for cell in grid:
        path = Path(out_dir) / "cells" / cell.name / RESULT_FILE
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        if stored.get("status") != "ok":
            continue
        rows.append({**asdict(cell), "lr": stored.get("lr"), "wall_s": stored["wall_s"], **stored["metrics"]})
    return rows


def aggregate(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """``{method: {batch: (mean, std, n)}}`` of ``metric`` over seeds.

    ``std`` is the sample standard deviation (``ddof = 1``); ``nan`` for a single seed.
    """
    groups: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if metric in row:
            groups.setdefault(row["method"], {}).setdefault(int(row["batch_size"]), []).append(float(row[metric]))
    out: dict[str, dict[int, tuple[float, float, int]]] = {}
    for method, by_batch in groups.items():
        out[method] = {}
        for batch, values in sorted(by_batch.items()):
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
            out[method][batch] = (mean, std, n)
    return out


def markdown_table(stats: Stats, *, scale: float = 100.0, digits: int = 1) -> str:
    """Markdown table: one row per method, one column per batch size, ``mean ± std (n)``.

    Values are multiplied by ``scale`` (100: accuracy in %); a missing cell shows ``-``.
    """
    batches = sorted({b for by_batch in stats.values() for b in by_batch})
    lines = ["| method | " + " | ".join(f"B={b}" for b in batches) + " |", "|---" * (len(batches) + 1) + "|"]
    for method, by_batch in stats.items():
        cells = []
        for b in batches:
            if b not in by_batch:
                cells.append("-")
                continue
            mean, std, n = by_batch[b]
            spread = "" if math.isnan(std) else f" ± {std * scale:.{digits}f}"
            cells.append(f"{mean * scale:.{digits}f}{spread} (n={n})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def method_label(method: str) -> str:
    """Legend entry of ``method``: its name and the group counts every cell of the sweep gave it
    (:func:`~normlightning.sweep.grid.method_preset`), e.g. ``"gn (num_groups=8)"``,
    ``"bgn (num_groups=auto)"`` (``auto``: chosen per batch size by the layer's rule)."""
    preset = method_preset(method)
    counts = {key: value for key, value in preset.items() if key != "method" and key != "kwargs"}
    counts.update(preset.get("kwargs", {}))
    return f"{method} ({', '.join(f'{k}={v}' for k, v in counts.items())})" if counts else method


def sweep_figure(
    stats: Stats,
    *,
    ylabel: str = "test top-1 accuracy (%)",
    scale: float = 100.0,
    title: str | None = None,
    reference: str | None = "bn",
    labels: Mapping[str, str] | None = None,
) -> Any:
    """Accuracy against the per-process batch size (log2 axis), one panel per method, every panel on the
    same y-axis so that they compare at a glance (BGN paper, Figure 1 bottom): the mean over seeds with
    error bars of ± one sample std, and the ``reference`` method's means as a dashed line in the other
    panels (``None`` or absent: no line). ``labels``: legend entry per method (default
    :func:`method_label`, with its group counts). Returns the matplotlib ``Figure`` (constrained layout:
    the title and the legend lie inside it, whatever the number of batch sizes)."""
    plt = plotting.require_matplotlib()
    if not stats:
        raise ValueError("plot_sweep: no finished cells to plot")
    methods = list(stats)
    labels = {m: (labels or {}).get(m) or method_label(m) for m in methods}
    batches = sorted({b for by_batch in stats.values() for b in by_batch})
    seeds = sorted({by_batch[b][2] for by_batch in stats.values() for b in by_batch})
    columns = min(len(methods), 4)
    rows = math.ceil(len(methods) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns + 0.6, 2.9 * rows + 1.2), sharey=True, squeeze=False, layout="constrained"
    )
    handles, names = [], []
    for k, (ax, method) in enumerate(zip(axes.flat, methods)):
        xs = sorted(stats[method])
        means = [stats[method][b][0] * scale for b in xs]
        stds = [0.0 if math.isnan(stats[method][b][1]) else stats[method][b][1] * scale for b in xs]
        if reference in stats and method != reference:
            ref_xs = sorted(stats[reference])
            line = ax.plot(
                ref_xs,
                [stats[reference][b][0] * scale for b in ref_xs],
                color="tab:gray",
                linestyle="--",
                linewidth=1.0,
                marker="x",
                markersize=4,
            )[0]
            if not any(name.startswith(f"{reference} mean") for name in names):
                handles.append(line)
                names.append(f"{reference} mean (dashed, for comparison)")
        handles.append(
            ax.errorbar(
                xs, means, yerr=stds, fmt="o-", color=COLOURS[k % len(COLOURS)], capsize=4, markersize=5, linewidth=1.2
            )
        )
        names.append(labels[method])
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        if len(batches) == 1:
            ax.set_xlim(batches[0] / 1.5, batches[0] * 1.5)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("per-process batch size (log2 axis)", fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(methods) :]:
        ax.set_visible(False)
    fig.supylabel(ylabel, fontsize=10)
    seed_text = (
        f"n = {seeds[0]} seed{'s' if seeds[0] != 1 else ''} per point"
        if len(seeds) == 1
        else f"n = {seeds[0]}-{seeds[-1]} seeds per point"
    )
    bars = "no bar with 1 seed" if seeds[0] == 1 else "bar: ± 1 sample std"
    fig.legend(
        handles,
        names,
        loc="outside lower center",
        ncol=min(len(names), 3),
        fontsize=8,
        frameon=False,
        title=f"mean over seeds ({seed_text}; {bars}); group counts as every cell set them",
        title_fontsize=8,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_sweep(stats: Stats, path: str | os.PathLike, **kwargs: Any) -> str:
    """Save :func:`sweep_figure` (same keyword arguments) as a PNG at ``path``; returns ``str(path)``."""
    plt = plotting.require_matplotlib()
    fig = sweep_figure(stats, **kwargs)
    out = os.fspath(path)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sweep_title(base_config: Mapping[str, Any], epochs: Mapping[int, int], metric: str) -> str:
    """``"Digits, small_cnn: test/acc1 by method (epochs 2 / 4 / 16 at batch 2 / 8 / 64)"``: the
    dataset (data class), the model (backbone or task class) and the epochs of a sweep."""
    data = str(base_config.get("data", {}).get("class_path", "?")).rsplit(".", 1)[-1]
    model = base_config.get("model", {})
    backbone = model.get("init_args", {}).get("backbone") or str(model.get("class_path", "?")).rsplit(".", 1)[-1]
    if len(set(epochs.values())) == 1:
        schedule = f"{next(iter(epochs.values()))} epochs"
    else:
        schedule = f"epochs {' / '.join(str(e) for e in epochs.values())} at batch {' / '.join(str(b) for b in epochs)}"
    return f"{data}, {backbone}: {metric} by normalization method ({schedule})"


def write_report(
    out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, metric: str, plot: bool, title: str | None = None
) -> dict[str, str]:
    """Write ``results.csv`` (all rows), ``table.md`` and (``plot``) ``accuracy_vs_batch.png``
    (:func:`plot_sweep`, with ``title``, e.g. :func:`sweep_title`)."""
    out = Path(out_dir)
    files = {}
    columns = ["method", "batch_size", "seed", "lr", "wall_s", *RESULT_METRICS]
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    files["results"] = str(out / "results.csv")
    stats = aggregate(rows, metric)
    table = f"{metric} in %, mean ± sample std over seeds (n = number of seeds)\n\n" + markdown_table(stats)
    (out / "table.md").write_text(table)
    files["table"] = str(out / "table.md")
    if plot and stats:
        files["plot"] = plot_sweep(stats, out / "accuracy_vs_batch.png", ylabel=f"{metric} (%)", title=title)
    return files
