"""The report of a batch-size sweep, from the cells' ``result.json`` files: ``results.csv``
(one row per finished cell), the mean and sample std over seeds (:func:`aggregate`), a
markdown table (``table.md``) and accuracy vs batch size (``accuracy_vs_batch.png``).
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

__all__ = ["aggregate", "collect_rows", "markdown_table", "plot_sweep", "write_report"]

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
) -> str:
    """Accuracy vs per-process batch size (log2 x axis), one line per method, std error bars
    (BGN paper, Figure 1 bottom). Returns ``str(path)``."""
    plt = plotting.require_matplotlib()
    if not stats:
        raise ValueError("plot_sweep: no finished cells to plot")
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    markers = "os^vD<>phX*"
    for k, (method, by_batch) in enumerate(stats.items()):
        batches = sorted(by_batch)
        means = [by_batch[b][0] * scale for b in batches]
        stds = [0.0 if math.isnan(by_batch[b][1]) else by_batch[b][1] * scale for b in batches]
        ax.errorbar(batches, means, yerr=stds, label=method, marker=markers[k % len(markers)], capsize=3, linewidth=1.2)
    all_batches = sorted({b for by_batch in stats.values() for b in by_batch})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_batches)
    ax.set_xticklabels([str(b) for b in all_batches])
    ax.set_xlabel("per-process batch size")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = os.fspath(path)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], *, metric: str, plot: bool) -> dict[str, str]:
    """Write ``results.csv`` (all rows), ``table.md`` and (``plot``) ``accuracy_vs_batch.png``."""
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
        files["plot"] = plot_sweep(stats, out / "accuracy_vs_batch.png")
    return files
