"""Batch-size sweep: a grid of (normalization method x per-process batch size x seed) runs.

Every cell is one ordinary normlightning run of a base config with a few keys overridden
(:func:`~normlightning.sweep.grid.cell_config`: the ``norm:`` preset of the method, the batch
size, the task's linear LR scaling from ``--base-batch-size``, the seed, the epochs, a CSV
logger and a TensorBoard logger, GPUs and nodes). Modules: :mod:`~normlightning.sweep.grid` (cells, presets, per-cell
config), :mod:`~normlightning.sweep.cell` (running one cell, reading its logs),
:mod:`~normlightning.sweep.executors` (inline, subprocess, submitit),
:mod:`~normlightning.sweep.runner` (preparing, resuming, running the grid),
:mod:`~normlightning.sweep.report` (aggregation, table, plot), :mod:`~normlightning.sweep.cli`.

Layout of ``out_dir``::

    cells/<method>_b<B>_s<seed>/cell.yaml           the full config the cell ran with
    cells/<method>_b<B>_s<seed>/logs/metrics.csv    the logger's metrics (source of the results)
    cells/<method>_b<B>_s<seed>/logs/tensorboard/   TensorBoard events with the cell's hparams (HParams tab)
    cells/<method>_b<B>_s<seed>/result.json         written last: spec, final metrics, LR, wall time
    jobs/<job id>_*                                 submitit's files of each job: log, call, result
    results.csv, table.md, accuracy_vs_batch.png, summary.json

Command line (see ``python -m normlightning.sweep --help``)::

    python -m normlightning.sweep --config examples/configs/sweep_digits.yaml \\
        --methods bn gn bgn --batch-sizes 2 8 64 --seeds 0 1 2 --epochs 2=2 8=4 64=16 --out runs/sweep

``--executor subprocess`` (default) runs each cell in a fresh ``python -m normlightning.sweep
--run-cell`` process; ``inline`` runs it in the calling process (no ~10 s import per cell);
``--workers N`` runs N cells at once in spawned worker processes; ``submitit`` submits one job
per cell (``--cluster slurm``, or ``local`` to try it on this machine), with
``--slurm-partition``, ``--time-limit``, ``--gpus-per-cell`` and ``--nodes-per-cell``. Each cell sets
``torch.set_num_threads(1)`` by default (``--threads``): for these tiny models on a shared CPU,
one thread is about 10x faster than two contending ones. Run one sweep per folder at a time.
"""

from normlightning.sweep.cell import is_finished, read_last_metrics, run_cell
from normlightning.sweep.cli import build_parser, console_main, main, parse_epochs
from normlightning.sweep.executors import EXECUTORS, ClusterSettings, run_cells
from normlightning.sweep.grid import (
    CONFIG_FILE,
    FIXED_GROUP_COUNTS,
    LOGS_DIR,
    METRICS_FILE,
    RESULT_FILE,
    RESULT_METRICS,
    SPEC_FILE,
    TENSORBOARD_DIR,
    Cell,
    cell_config,
    cell_spec,
    epochs_per_batch,
    make_grid,
    method_preset,
)
from normlightning.sweep.report import (
    aggregate,
    collect_rows,
    markdown_table,
    plot_sweep,
    sweep_figure,
    sweep_title,
    write_report,
)
from normlightning.sweep.runner import SweepResult, run_sweep

__all__ = [
    "CONFIG_FILE",
    "EXECUTORS",
    "FIXED_GROUP_COUNTS",
    "LOGS_DIR",
    "METRICS_FILE",
    "TENSORBOARD_DIR",
    "RESULT_FILE",
    "RESULT_METRICS",
    "SPEC_FILE",
    "Cell",
    "ClusterSettings",
    "SweepResult",
    "aggregate",
    "build_parser",
    "cell_config",
    "cell_spec",
    "collect_rows",
    "console_main",
    "epochs_per_batch",
    "is_finished",
    "main",
    "make_grid",
    "markdown_table",
    "method_preset",
    "parse_epochs",
    "plot_sweep",
    "sweep_figure",
    "read_last_metrics",
    "run_cell",
    "run_cells",
    "run_sweep",
    "sweep_title",
    "write_report",
]
