"""Running one prepared sweep cell and reading its results back from its logs.

A cell runs as one ordinary normlightning run: :func:`normlightning.cli.build_cli` parses and
instantiates its ``cell.yaml``, then ``trainer.fit`` and ``trainer.test`` on the final weights.
Its metrics are read back from its ``logs/metrics.csv`` (the last logged value of each), not from
memory, so a finished cell is described by its logs alone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from normlightning.sweep.grid import CONFIG_FILE, LOGS_DIR, METRICS_FILE, RESULT_FILE, RESULT_METRICS, SPEC_FILE

__all__ = ["is_finished", "read_last_metrics", "run_cell"]


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


def is_finished(cell_dir: Path, spec: Mapping[str, Any]) -> bool:
    """Whether ``cell_dir`` holds a successful result of a cell with this ``spec``."""
    path = cell_dir / RESULT_FILE
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return stored.get("spec") == dict(spec) and stored.get("status") == "ok"


def run_cell(cell_dir: str | os.PathLike, threads: int | None = 1) -> dict[str, Any] | None:
    """Run the cell whose config is ``cell_dir/cell.yaml`` (fit, then test the final weights).

    Writes ``cell_dir/result.json`` (``status``, ``spec``, ``metrics`` read from the logs,
    ``lr``, ``wall_s``) and returns it. ``threads`` sets ``torch.set_num_threads`` (1 is by far
    the fastest for tiny models on a shared CPU). In a cell that runs as several processes (DDP
    on several GPUs), only the process of global rank 0 writes and returns the result; the
    others return ``None``.
    """
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from normlightning.cli import build_cli

    cell_dir = Path(cell_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    spec = json.loads((cell_dir / SPEC_FILE).read_text())
    start = time.perf_counter()
    if getattr(rank_zero_only, "rank", 0) == 0:
        shutil.rmtree(cell_dir / LOGS_DIR, ignore_errors=True)  # a rerun must not read an earlier attempt's logs
    cli = build_cli(["--config", str(cell_dir / CONFIG_FILE)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    group = cli.trainer.optimizers[0].param_groups[0]
    # the LR the run started from: after the task's linear scaling, before the schedule
    lr = float(group.get("initial_lr", group["lr"]))
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if not cli.trainer.is_global_zero:
        return None
    metrics_path = cell_dir / METRICS_FILE
    logged = read_last_metrics(metrics_path)
    if "test/acc1" not in logged:
        raise RuntimeError(f"sweep cell {cell_dir.name}: test/acc1 not found in {metrics_path}")
    result = {
        "status": "ok",
        "spec": spec,
        "metrics": {k: logged[k] for k in RESULT_METRICS if k in logged},
        "lr": lr,
        "wall_s": time.perf_counter() - start,
    }
    (cell_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    return result
