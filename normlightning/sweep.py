"""Batch-size sweep: a grid of (normalization method x per-process batch size x seed) runs.

Every cell is one ordinary normlightning run: the base config (any ``normlightning fit``
config) with a few keys overridden, parsed and instantiated by
:func:`normlightning.cli.build_cli`, then ``trainer.fit`` and ``trainer.test`` on the final
weights. The overrides of cell ``(method, B, seed)``:

- ``norm``: the method and its preset arguments (:data:`METHOD_PRESETS`), injected by the
  ``NormInjection`` callback (the ``norm:`` section of the CLI);
- ``data.init_args.batch_size = B`` (per process) and ``drop_last = True`` (so no training
  batch has a single example, which batch-statistic layers reject);
- the learning rate, scaled linearly with the batch (Goyal et al. 2017)::

      lr(B) = base_lr * B / base_batch_size

  where ``base_lr`` is the optimizer ``lr`` of the base config;
- ``seed_everything = seed`` (weights, data order); the data split keeps its own seed;
- ``trainer.max_epochs = epochs`` (one number for all cells, or one per batch size) and
  ``T_max`` of a ``CosineAnnealingLR`` scheduler;
- a ``CSVLogger`` writing into the cell folder, no checkpoint files.

Layout of ``out_dir``::

    cells/<method>_b<B>_s<seed>/cell.yaml        the full config the cell ran with
    cells/<method>_b<B>_s<seed>/metrics.csv      the logger's metrics (source of the results)
    cells/<method>_b<B>_s<seed>/result.json      written last: spec, final metrics, wall time
    results.csv, table.md, accuracy_vs_batch.png, summary.json

Resuming: a cell whose ``result.json`` holds the same spec (method, batch, seed, epochs, lr,
config) is finished and is not run again; any other cell (missing, crashed, or with a
changed spec) is (re)run. Metrics are read back from ``metrics.csv`` (the last logged value
of each metric), not from memory, so a finished cell is described by its logs alone.

Command line (see ``python -m normlightning.sweep --help``)::

    python -m normlightning.sweep --config examples/configs/sweep_digits.yaml \\
        --methods bn gn bgn --batch-sizes 2 8 64 --seeds 0 1 2 --epochs 2=2 8=4 64=16 --out runs/sweep

``--isolation subprocess`` (default) runs each cell in a fresh ``python -m normlightning.sweep
--run-cell`` process; ``inline`` runs it in the calling process (no ~10 s import per cell);
``--workers N`` runs N cells at once in spawned worker processes. Each cell sets
``torch.set_num_threads(1)`` by default (``--threads``): for these tiny models on a shared CPU,
one thread is about 10x faster than two contending ones. Run one sweep per folder at a time.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from normlightning import plotting

__all__ = [
    "METHOD_PRESETS",
    "Cell",
    "SweepResult",
    "make_grid",
    "cell_config",
    "cli_config",
    "scaled_lr",
    "run_cell",
    "run_sweep",
    "read_last_metrics",
    "aggregate",
    "markdown_table",
    "plot_sweep",
    "main",
    "console_main",
]

#: ``norm:`` section per method (merged into the cell config). Group counts are chosen for
#: narrow conv nets (16-64 channels): ``gn`` 8 groups, ``gbgn`` 8 channel groups and
#: contiguous groups of 16 examples; ``bgn``/``ghost``/``seqnorm`` take the ``auto`` rules of
#: the injection (BGN's paper mapping from the batch size; ghost batches of >= 16 examples,
#: so ``ghost`` equals ``bn`` below batch 32). ``hn`` is the paper default (mean BN, std EN:1).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "bn": {"method": "bn"},
    "gn": {"method": "gn", "num_groups": 8},
    "ln": {"method": "ln"},
    "in": {"method": "in"},
    "pn": {"method": "pn"},
    "ghost": {"method": "ghost", "num_groups": "auto"},
    "seqnorm": {"method": "seqnorm", "num_groups": "auto"},
    "bgn": {"method": "bgn", "num_groups": "auto"},
    "gbgn": {"method": "gbgn", "kwargs": {"channel_groups": 8, "examples_per_group": 16}},
    "hn": {"method": "hn"},
    "sn": {"method": "sn"},
    "brn": {"method": "brn"},
}

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "cell.yaml"
#: Metrics copied from each cell's logs into ``results.csv``.
RESULT_METRICS = ("test/acc1", "test/loss", "val/acc1", "val/loss", "train/loss_epoch")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: normalization ``method``, per-process ``batch_size``, ``seed``."""

    method: str
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        """Folder name, e.g. ``bgn_b8_s1``."""
        return f"{self.method}_b{self.batch_size}_s{self.seed}"


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: per-cell status (``ran``/``skipped``/``failed``) and rows."""

    status: dict[str, str] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def make_grid(methods: Sequence[str], batch_sizes: Sequence[int], seeds: Sequence[int]) -> list[Cell]:
    """All cells, method-major then batch then seed; checks the settings.

    Raises:
        ValueError: empty axis, duplicate entries, a batch size < 2 or a method without a preset
            (a name registered with ``register_norm`` but absent from :data:`METHOD_PRESETS`
            is allowed: it gets ``{"method": name}``).
    """
    from normlightning.norms import available_norms

    for axis, values in (("methods", methods), ("batch_sizes", batch_sizes), ("seeds", seeds)):
        if len(values) == 0:
            raise ValueError(f"sweep: {axis} is empty; give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"sweep: {axis} has duplicates: {list(values)}")
    known = set(METHOD_PRESETS) | set(available_norms())
    for method in methods:
        if method not in known:
            raise ValueError(f"sweep: unknown method {method!r}; valid: {sorted(known)}")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 2:
            raise ValueError(f"sweep: batch sizes must be ints >= 2 (batch statistics need 2 examples), got {b!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ValueError(f"sweep: seeds must be ints, got {s!r}")
    return [Cell(m, int(b), int(s)) for m in methods for b in batch_sizes for s in seeds]


def scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Linear scaling rule: ``base_lr * batch_size / base_batch_size``."""
    if base_lr <= 0 or base_batch_size < 1 or batch_size < 1:
        raise ValueError(
            f"sweep: need base_lr > 0 and positive batch sizes, got base_lr={base_lr}, "
            f"batch_size={batch_size}, base_batch_size={base_batch_size}"
        )
    return base_lr * batch_size / base_batch_size


def _norm_section_supported() -> bool:
    from normlightning.cli import NormLightningCLI

    return "norm" in getattr(NormLightningCLI, "forced_callbacks", {})


def cell_config(
    base: Mapping[str, Any], cell: Cell, *, epochs: int, base_batch_size: int, cell_dir: str | os.PathLike
) -> dict[str, Any]:
    """The full config of ``cell`` (see the module docstring for the overridden keys).

    Args:
        base: a normlightning config (dict, as loaded from YAML) with ``model.init_args.optimizer``
            (``class_path`` + ``init_args.lr``) and a ``data`` section with ``init_args``.
        cell: the grid cell.
        epochs: ``trainer.max_epochs``.
        base_batch_size: batch size at which the base config's ``lr`` holds.
        cell_dir: the cell folder (logs go there).
    """
    config = copy.deepcopy(dict(base))
    try:
        optimizer = config["model"]["init_args"]["optimizer"]
        base_lr = float(optimizer["init_args"]["lr"])
        data_args = config["data"]["init_args"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            "sweep: the base config needs model.init_args.optimizer.init_args.lr (the LR at "
            f"--base-batch-size) and data.init_args; missing {err}"
        ) from None
    optimizer["init_args"]["lr"] = scaled_lr(base_lr, cell.batch_size, base_batch_size)
    scheduler = config["model"]["init_args"].get("lr_scheduler")
    if isinstance(scheduler, Mapping) and str(scheduler.get("class_path", "")).endswith("CosineAnnealingLR"):
        scheduler.setdefault("init_args", {})["T_max"] = epochs
    data_args["batch_size"] = cell.batch_size
    data_args["drop_last"] = True
    config["seed_everything"] = cell.seed
    trainer = config.setdefault("trainer", {})
    trainer.update(
        {
            "max_epochs": epochs,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(cell_dir), "name": "", "version": ""},
            },
        }
    )
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if not _is_injection(c)]
    checkpoint = config.setdefault("checkpoint", {})
    checkpoint.update({"save_top_k": 0, "save_last": False, "dirpath": str(Path(cell_dir) / "checkpoints")})
    config["norm"] = copy.deepcopy(METHOD_PRESETS.get(cell.method, {"method": cell.method}))
    return config


def cli_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as the installed CLI reads it: the ``norm:`` section stays when the CLI has
    one, otherwise it becomes the same ``NormInjection`` callback listed in ``trainer.callbacks``."""
    config = copy.deepcopy(dict(config))
    if "norm" not in config or _norm_section_supported():
        return config
    norm = config.pop("norm")
    config.setdefault("trainer", {}).setdefault("callbacks", []).append(
        {"class_path": "normlightning.callbacks.norm_injection.NormInjection", "init_args": norm}
    )
    return config


def _is_injection(callback: Any) -> bool:
    return isinstance(callback, Mapping) and str(callback.get("class_path", "")).endswith("NormInjection")


def _spec(cell: Cell, config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a finished cell: the cell and a hash of its full config (minus paths)."""
    stable = copy.deepcopy(dict(config))
    stable.get("trainer", {}).pop("logger", None)
    stable.get("checkpoint", {}).pop("dirpath", None)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**asdict(cell), "config_sha256": digest}


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
    lr = float(group.get("initial_lr", group["lr"]))  # the LR the run started from (before the schedule)
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
        base_batch_size: the batch size at which the base config's ``lr`` holds.
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
    epochs_of = _epochs_per_batch(epochs, batch_sizes)
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
        spec = _spec(cell, config)
        if _is_finished(cell_dir, spec):
            result.status[cell.name] = "skipped"
            continue
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / RESULT_FILE).unlink(missing_ok=True)
        (cell_dir / "error.txt").unlink(missing_ok=True)
        (cell_dir / CONFIG_FILE).write_text(yaml.safe_dump(cli_config(config), sort_keys=False))
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


def _epochs_per_batch(epochs: int | Mapping[int, int], batch_sizes: Sequence[int]) -> dict[int, int]:
    """``{batch_size: epochs}`` from an int (same for all) or a mapping covering every batch size."""
    table = dict(epochs) if isinstance(epochs, Mapping) else {int(b): epochs for b in batch_sizes}
    missing = [b for b in batch_sizes if b not in table]
    if missing:
        raise ValueError(f"sweep: epochs per batch size misses batch sizes {missing}; give e.g. {{2: 2, 64: 20}}")
    for b, e in table.items():
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"sweep: epochs must be positive ints, got {e!r} for batch size {b}")
    return {int(b): table[b] for b in batch_sizes}


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


def markdown_table(stats: Mapping[str, Mapping[int, tuple[float, float, int]]], *, scale: float = 100.0, digits: int = 1) -> str:
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
    stats: Mapping[str, Mapping[int, tuple[float, float, int]]],
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


def _parse_epochs(values: Sequence[str]) -> int | dict[int, int]:
    """``["3"]`` -> 3; ``["2=2", "64=30"]`` -> ``{2: 2, 64: 30}``."""
    try:
        if len(values) == 1 and "=" not in values[0]:
            return int(values[0])
        return {int(b): int(e) for b, e in (v.split("=", 1) for v in values)}
    except ValueError:
        raise SystemExit(f"sweep: --epochs takes one int or B=E pairs (e.g. 2=2 64=30), got {list(values)}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m normlightning.sweep",
        description="Run (or resume) a grid of normalization method x per-process batch size x seed, "
        "with the LR scaled linearly with the batch; writes results.csv, table.md and accuracy_vs_batch.png.",
    )
    parser.add_argument("--config", help="base normlightning config (YAML); its optimizer lr holds at --base-batch-size")
    parser.add_argument("--out", default="runs/sweep", help="sweep folder (reuse it to resume)")
    parser.add_argument("--methods", nargs="+", default=["bn", "gn", "bgn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", nargs="+", default=["1"],
                        help="epochs of every cell (one int), or per batch size as B=E pairs, e.g. 2=2 8=4 64=30")
    parser.add_argument("--base-batch-size", type=int, default=64)
    parser.add_argument("--isolation", choices=["subprocess", "inline"], default="subprocess")
    parser.add_argument("--workers", type=int, default=1, help="cells run in parallel (worker processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (0: torch default)")
    parser.add_argument("--metric", default="test/acc1")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--run-cell", help=argparse.SUPPRESS)  # internal: run one prepared cell folder
    return parser


def main(argv: Sequence[str] | None = None) -> SweepResult | None:
    """Command-line entry point (``python -m normlightning.sweep``)."""
    args = build_parser().parse_args(argv)
    threads = args.threads or None
    if args.run_cell:
        run_cell(args.run_cell, threads=threads)
        return None
    if not args.config:
        build_parser().error("--config is required (e.g. examples/configs/sweep_digits.yaml)")
    result = run_sweep(
        args.config, args.out, methods=args.methods, batch_sizes=args.batch_sizes, seeds=args.seeds,
        epochs=_parse_epochs(args.epochs), base_batch_size=args.base_batch_size, isolation=args.isolation, threads=threads,
        workers=args.workers,
        metric=args.metric, plot=not args.no_plot,
    )
    counts = {s: sum(1 for v in result.status.values() if v == s) for s in ("ran", "skipped", "failed")}
    print(f"[sweep] {counts} in {result.wall_s:.1f} s; table: {result.files.get('table')}")
    print(Path(result.files["table"]).read_text())
    return result


def console_main() -> None:
    """Console-script entry (returns nothing, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
