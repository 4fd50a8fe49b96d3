"""The report of a batch-size sweep, from the cells' ``result.json`` files: ``results.csv``
(one row per finished cell), the mean and sample std over seeds (:func:`aggregate`), a
markdown table (``table.md``) and accuracy by method, one panel per batch size (``accuracy_vs_batch.png``).
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
from normlightning.sweep.grid import RESULT_FILE, RESULT_METRICS, Cell

__all__ = ["aggregate", "collect_rows", "markdown_table", "plot_sweep", "sweep_title", "write_report"]

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


def plot_sweep(
    stats: Stats,
    path: str | os.PathLike,
    *,
    ylabel: str = "test top-1 accuracy (%)",
    scale: float = 100.0,
    title: str | None = None,
    reference: str | None = "bn",
) -> str:
    """One panel per per-process batch size, the methods side by side in each (BGN paper,
    Figure 1 bottom, read per batch size): mean over seeds with error bars of ± one sample std,
    and a dashed line at the ``reference`` method's mean (``None`` or absent: no line). Each panel
    has its own y range, so methods that nearly tie at one batch size stay apart. Returns ``str(path)``.
    """
    plt = plotting.require_matplotlib()
    if not stats:
        raise ValueError("plot_sweep: no finished cells to plot")
    methods = list(stats)
    batches = sorted({b for by_batch in stats.values() for b in by_batch})
    seeds = sorted({by_batch[b][2] for by_batch in stats.values() for b in by_batch})
    fig, axes = plt.subplots(1, len(batches), figsize=(max(4.0, 0.45 * len(methods) + 1.6) * len(batches), 4.6),
                             squeeze=False)
    handles: dict[str, Any] = {}
    for ax, batch in zip(axes[0], batches):
        xs = [i for i, m in enumerate(methods) if batch in stats[m]]
        means = [stats[methods[i]][batch][0] * scale for i in xs]
        stds = [0.0 if math.isnan(stats[methods[i]][batch][1]) else stats[methods[i]][batch][1] * scale for i in xs]
        handles["cells"] = ax.errorbar(xs, means, yerr=stds, fmt="o", color="tab:blue", ecolor="tab:blue",
                                       capsize=4, markersize=5, linewidth=1.2)
        if reference in stats and batch in stats[reference]:
            handles["reference"] = ax.axhline(stats[reference][batch][0] * scale, color="tab:gray", linestyle="--",
                                              linewidth=1.0)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=45, ha="right")
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"per-process batch size {batch}", fontsize=10)
        ax.set_xlabel("normalization method")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    seed_text = f"n = {seeds[0]} seed{'s' if seeds[0] != 1 else ''}" if len(seeds) == 1 else \
        f"n = {seeds[0]}-{seeds[-1]} seeds per cell"
    if seeds[0] == 1:
        seed_text += "; no bar with 1 seed"
    labels = {"cells": f"mean over seeds; bar: ± 1 sample std ({seed_text})",
              "reference": f"{reference} mean at that batch size"}
    fig.legend([handles[k] for k in handles], [labels[k] for k in handles], loc="lower center",
               ncol=len(handles), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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
        schedule = (f"epochs {' / '.join(str(e) for e in epochs.values())} at batch "
                    f"{' / '.join(str(b) for b in epochs)}")
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
