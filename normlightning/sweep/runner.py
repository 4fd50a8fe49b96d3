"""Running a batch-size sweep: prepare every cell of the grid, skip the finished ones, run
the others (in this process, in a fresh subprocess each, or in a pool of workers), then write
the report.

A cell runs as one ordinary normlightning run: :func:`normlightning.cli.build_cli` parses and
instantiates its ``cell.yaml``, then ``trainer.fit`` and ``trainer.test`` on the final weights.
Its metrics are read back from its ``metrics.csv`` (the last logged value of each), not from
memory, so a finished cell is described by its logs alone. Resuming: a cell whose
``result.json`` holds the same spec (:func:`~normlightning.sweep.grid.cell_spec`) is finished and
is not run again; any other cell (missing, crashed, or with a changed spec) is (re)run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normlightning import plotting
from normlightning.sweep.grid import (
    CONFIG_FILE,
    METRICS_FILE,
    RESULT_FILE,
    RESULT_METRICS,
    cell_config,
    cell_spec,
    epochs_per_batch,
    make_grid,
)
from normlightning.sweep.report import collect_rows, write_report

__all__ = ["SweepResult", "read_last_metrics", "run_cell", "run_sweep"]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: per-cell status (``ran``/``skipped``/``failed``) and rows."""

    status: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def read_last_metrics(path: str | os.PathLike) -> dict[str, float]:
    """Last non-empty value of every column of a Lightning ``CSVLogger`` ``metrics.csv``.

    Raises:
        FileNotFoundError: no such file (the cell did not log).
    """
    last: dict[str, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                last[key] = float(value)
    return last


def _is_finished(cell_dir: Path, spec: Mapping[str, Any]) -> bool:
    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("spec") == dict(spec) and stored.get("status") == "ok"


def run_cell(cell_dir: str | os.PathLike, threads: int | None = 1) -> dict[str, Any]:
    """Run the cell whose config is ``cell_dir/cell.yaml`` (fit, then test the final weights).

    Writes ``cell_dir/result.json`` (``status``, ``spec``, ``metrics`` read from the logs,
    ``wall_s``) and returns it. ``threads`` sets ``torch.set_num_threads`` (1 is by far the
    fastest for tiny models on a shared CPU).
    """
    import torch

    from normlightning.cli import build_cli

    cell_dir = Path(cell_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    config_path = cell_dir / CONFIG_FILE
    spec = json.loads((cell_dir / "spec.json").read_text())
    start = time.perf_counter()
    metrics_path = cell_dir / METRICS_FILE
    if metrics_path.exists():
        metrics_path.unlink()  # a rerun must not read an earlier attempt's values
    cli = build_cli(["--config", str(config_path)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    group = cli.trainer.optimizers[0].param_groups[0]
    # the LR the run started from: after the task's linear scaling, before the schedule
    lr = float(group.get("initial_lr", group["lr"]))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    logged = read_last_metrics(metrics_path)
    missing = [k for k in ("test/acc1",) if k not in logged]
    if missing:
        raise RuntimeError(f"sweep cell {cell_dir.name}: {missing} not found in {metrics_path}")
    result = {
        "status": "ok",
        "spec": spec,
        "metrics": {k: logged[k] for k in RESULT_METRICS if k in logged},
        "lr": lr,
        "wall_s": time.perf_counter() - start,
    }
    (cell_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    return result


def run_sweep(
    base_config: Mapping[str, Any] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    methods: Sequence[str],
    batch_sizes: Sequence[int],
    seeds: Sequence[int] = (0,),
    epochs: int | Mapping[int, int] = 1,
    base_batch_size: int = 64,
    isolation: str = "subprocess",
    threads: int | None = 1,
    workers: int = 1,
    metric: str = "test/acc1",
    plot: bool = True,
    log: Any = print,
) -> SweepResult:
    """Run (or resume) the grid and write ``results.csv``, ``table.md`` and the plot.

    Args:
        base_config: config dict or path of a YAML config (see :func:`cell_config`).
        out_dir: sweep folder (created); reuse it to resume.
        methods, batch_sizes, seeds: the grid axes (see :func:`make_grid`).
        epochs: training epochs of every cell, or ``{batch_size: epochs}`` (every batch size of
            the grid listed) to give small-step-count large batches more passes over the data.
        base_batch_size: the batch size at which the base config's ``lr`` holds (the task's
            ``lr_base_batch_size``: each cell starts from ``lr * B * world_size / base_batch_size``).
        isolation: ``"subprocess"`` (one fresh ``python -m normlightning.sweep --run-cell``
            per cell: robust, ~10 s import overhead each) or ``"inline"`` (in this process: fast).
        threads: torch threads per cell (``None``: leave torch's default).
        workers: cells run at once (``> 1``: a pool of that many spawned worker processes, each
            running cells as ``isolation`` says). Run one sweep per ``out_dir`` at a time.
        metric: metric of the table and plot.
        plot: write ``accuracy_vs_batch.png`` (needs matplotlib).
        log: progress printer (``None`` for silence).

    Returns:
        A :class:`SweepResult`; a failed cell is reported (``status == "failed"``, traceback in
        ``cell_dir/error.txt``) and left out of the table; it runs again on the next call.
    """
    if isolation not in ("subprocess", "inline"):
        raise ValueError(f"sweep: isolation must be 'subprocess' or 'inline', got {isolation!r}")
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
        config = cell_config(base_config, cell, epochs=epochs_of[cell.batch_size], base_batch_size=base_batch_size,
                             cell_dir=cell_dir)
        spec = cell_spec(cell, config)
        if _is_finished(cell_dir, spec):
            result.status[cell.name] = "skipped"
            continue
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / RESULT_FILE).unlink(missing_ok=True)
        (cell_dir / "error.txt").unlink(missing_ok=True)
        (cell_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (cell_dir / "spec.json").write_text(json.dumps(spec))
        pending.append(cell_dir)
    log(f"[sweep] {len(pending)} of {len(grid)} cells to run ({len(grid) - len(pending)} finished before)", flush=True)
    if workers == 1:
        for i, cell_dir in enumerate(pending, 1):
            log(f"[sweep] {i}/{len(pending)} {cell_dir.name} ...", flush=True)
            status, seconds = _attempt(cell_dir, isolation, threads)
            result.status[cell_dir.name] = status
            log(f"[sweep] {cell_dir.name} {status} in {seconds:.1f} s", flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: fresh interpreters (no forked torch/Lightning state); each imports once and runs many cells
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_attempt, d, isolation, threads): d for d in pending}
            for future in futures:
                status, seconds = future.result()
                result.status[futures[future].name] = status
                log(f"[sweep] {futures[future].name} {status} in {seconds:.1f} s", flush=True)
    result.wall_s = time.perf_counter() - start
    result.rows = collect_rows(out, grid)
    result.files = write_report(out, result.rows, metric=metric, plot=plot)
    summary = {
        "methods": list(methods), "batch_sizes": list(batch_sizes), "seeds": list(seeds),
        "epochs": {str(b): e for b, e in epochs_of.items()},
        "base_batch_size": base_batch_size, "isolation": isolation, "workers": workers, "status": result.status,
        "wall_s_this_call": result.wall_s,
        "cell_wall_s_total": sum(r["wall_s"] for r in result.rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return result


def _attempt(cell_dir: Path, isolation: str, threads: int | None) -> tuple[str, float]:
    """Run one prepared cell; ``("ran" | "failed", seconds)``; a failure leaves ``error.txt``."""
    t0 = time.perf_counter()
    try:
        if isolation == "inline":
            run_cell(cell_dir, threads=threads)
        else:
            _run_cell_subprocess(cell_dir, threads)
    except Exception:  # noqa: BLE001 - one failed cell must not stop the grid
        (cell_dir / "error.txt").write_text(traceback.format_exc())
        return "failed", time.perf_counter() - t0
    return "ran", time.perf_counter() - t0


def _run_cell_subprocess(cell_dir: Path, threads: int | None) -> None:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "normlightning.sweep", "--run-cell", str(cell_dir)]
    if threads is not None:
        command += ["--threads", str(threads)]
    with open(cell_dir / "stdout.txt", "w") as stdout:
        proc = subprocess.run(command, stdout=stdout, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not (cell_dir / RESULT_FILE).is_file():
        tail = (cell_dir / "stdout.txt").read_text()[-3000:]
        raise RuntimeError(f"cell {cell_dir.name} exited with code {proc.returncode}:\n{tail}")
