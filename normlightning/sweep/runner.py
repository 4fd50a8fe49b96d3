"""Running a batch-size sweep: prepare every cell of the grid, skip the finished ones, run the
others with an executor (:mod:`normlightning.sweep.executors`), then write the report.

Resuming: a cell whose ``result.json`` holds the same spec (:func:`~normlightning.sweep.grid.cell_spec`)
is finished and is not run again, whichever executor ran it; any other cell (missing, crashed,
or with a changed spec) is (re)run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normlightning import plotting
from normlightning.sweep.cell import is_finished
from normlightning.sweep.executors import EXECUTORS, ClusterSettings, run_cells
from normlightning.sweep.grid import (
    CONFIG_FILE,
    RESULT_FILE,
    SPEC_FILE,
    cell_config,
    cell_spec,
    epochs_per_batch,
    make_grid,
)
from normlightning.sweep.report import collect_rows, sweep_title, write_report

__all__ = ["SweepResult", "run_sweep"]

#: submitit's job folders (logs, pickled calls and results), inside the sweep folder.
JOBS_DIR = "jobs"


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: per-cell status (``ran``/``skipped``/``failed``) and rows."""

    status: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def run_sweep(
    base_config: Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int] = (0,),
    epochs: int | Mapping[int, int] = 1,
    base_batch_size: int = 64,
    executor: str = "subprocess",
    cluster: ClusterSettings | None = None,
    threads: int | None = 1,
    workers: int = 1,
    metric: str = "test/acc1",
    plot: bool = True,
    log: Any = print,
) -> SweepResult:
    """Run (or resume) the grid and write ``results.csv``, ``table.md`` and the plot.

    Args:
        base_config: config dict or path of a YAML config (see :func:`~normlightning.sweep.grid.cell_config`).
        out_dir: sweep folder (created); reuse it to resume.
        methods, batch_sizes, seeds: the grid axes (see :func:`~normlightning.sweep.grid.make_grid`).
        epochs: training epochs of every cell, or ``{batch_size: epochs}`` (every batch size of
            the grid listed) to give small-step-count large batches more passes over the data.
        base_batch_size: the batch size at which the base config's ``lr`` holds (the task's
            ``lr_base_batch_size``: each cell starts from ``lr * B * world_size / base_batch_size``).
        executor: ``"subprocess"`` (one fresh process per cell: robust, ~10 s import each),
            ``"inline"`` (in this process: fast) or ``"submitit"`` (one cluster job per cell; see
            :mod:`normlightning.sweep.executors`).
        cluster: the jobs' cluster, time limit and GPUs / nodes per cell (default: local, CPU).
        threads: torch threads per cell (``None``: leave torch's default).
        workers: cells run at once with ``inline``/``subprocess`` (``> 1``: a pool of spawned
            worker processes); with ``submitit`` on SLURM, the job array's parallelism limit.
            Run one sweep per ``out_dir`` at a time.
        metric: metric of the table and plot.
        plot: write ``accuracy_vs_batch.png`` (needs matplotlib).
        log: progress printer (``None`` for silence).

    Returns:
        A :class:`SweepResult`; a failed cell is reported (``status == "failed"``, the reason in
        ``cell_dir/error.txt``) and left out of the table; it runs again on the next call.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"sweep: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    cluster = cluster or ClusterSettings()
    epochs_of = epochs_per_batch(epochs, batch_sizes)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"sweep: workers must be a positive int, got {workers!r}")
    if plot:
        plotting.require_matplotlib()
    log = log or (lambda *a, **k: None)
    if not isinstance(base_config, Mapping):
        base_config = yaml.safe_load(Path(base_config).read_text())
    grid = make_grid(methods, batch_sizes, seeds)
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    result = SweepResult()
    start = time.perf_counter()
    pending: list[Path] = []
    for cell in grid:
        cell_dir = out / "cells" / cell.name
        config = cell_config(
            base_config,
            cell,
            epochs=epochs_of[cell.batch_size],
            base_batch_size=base_batch_size,
            cell_dir=cell_dir,
            gpus=cluster.gpus_per_cell,
            nodes=cluster.nodes_per_cell,
        )
        spec = cell_spec(cell, config)
        if is_finished(cell_dir, spec):
            result.status[cell.name] = "skipped"
            continue
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / RESULT_FILE).unlink(missing_ok=True)
        (cell_dir / "error.txt").unlink(missing_ok=True)
        (cell_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (cell_dir / SPEC_FILE).write_text(json.dumps(spec))
        pending.append(cell_dir)
    log(
        f"[sweep] {len(pending)} of {len(grid)} cells to run ({len(grid) - len(pending)} finished before), "
        f"executor {executor}",
        flush=True,
    )
    result.status.update(
        run_cells(
            pending, executor, threads=threads, workers=workers, cluster=cluster, jobs_dir=out / JOBS_DIR, log=log
        )
    )
    result.wall_s = time.perf_counter() - start
    result.rows = collect_rows(out, grid)
    result.files = write_report(
        out, result.rows, metric=metric, plot=plot, title=sweep_title(base_config, epochs_of, metric)
    )
    summary = {
        "methods": list(methods),
        "batch_sizes": list(batch_sizes),
        "seeds": list(seeds),
        "epochs": {str(b): e for b, e in epochs_of.items()},
        "base_batch_size": base_batch_size,
        "executor": executor,
        "cluster": cluster.cluster,
        "workers": workers,
        "gpus_per_cell": cluster.gpus_per_cell,
        "nodes_per_cell": cluster.nodes_per_cell,
        "status": result.status,
        "wall_s_this_call": result.wall_s,
        "cell_wall_s_total": sum(r["wall_s"] for r in result.rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
