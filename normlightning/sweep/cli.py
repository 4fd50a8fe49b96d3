"""Command line of the batch-size sweep: ``python -m normlightning.sweep`` and the
``normlightning-sweep`` console script (see :func:`build_parser` for the options)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from normlightning.sweep.cell import run_cell
from normlightning.sweep.executors import EXECUTORS, ClusterSettings
from normlightning.sweep.runner import SweepResult, run_sweep

__all__ = ["build_parser", "console_main", "main", "parse_epochs", "report_failures"]


def parse_epochs(values: Sequence[str]) -> int | dict[int, int]:
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
    parser.add_argument(
        "--config", help="base normlightning config (YAML); its optimizer lr holds at --base-batch-size"
    )
    parser.add_argument("--out", default="runs/sweep", help="sweep folder (reuse it to resume)")
    parser.add_argument("--methods", nargs="+", default=["bn", "gn", "bgn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8, 64])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--epochs",
        nargs="+",
        default=["1"],
        help="epochs of every cell (one int), or per batch size as B=E pairs, e.g. 2=2 8=4 64=30",
    )
    parser.add_argument("--base-batch-size", type=int, default=64)
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="subprocess",
        help="how cells run: one fresh process each (subprocess), in this process (inline), or "
        'one cluster job each (submitit; pip install "normlightning[cluster]")',
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="inline/subprocess: cells run in parallel (worker processes); submitit on SLURM: the "
        "job array's parallelism limit",
    )
    jobs = parser.add_argument_group("cluster jobs (--executor submitit)")
    jobs.add_argument(
        "--cluster",
        choices=["local", "slurm"],
        default="local",
        help="submit to SLURM, or run the jobs on this machine (local)",
    )
    jobs.add_argument("--slurm-partition", default=None, help="SLURM partition (default: the cluster's)")
    jobs.add_argument("--time-limit", type=int, default=60, help="wall-time limit of one cell's job, in minutes")
    jobs.add_argument(
        "--gpus-per-cell",
        type=int,
        default=0,
        help="GPUs of one cell over all its nodes (0: the base config's accelerator); with more than "
        "one, the cell trains with DDP, one SLURM task per GPU",
    )
    jobs.add_argument("--nodes-per-cell", type=int, default=1, help="nodes of one cell (trainer.num_nodes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (0: torch default)")
    parser.add_argument("--metric", default="test/acc1")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--run-cell", help=argparse.SUPPRESS)  # internal: run one prepared cell folder
    return parser


def main(argv: Sequence[str] | None = None) -> SweepResult | None:
    """Command-line entry point (``python -m normlightning.sweep``).

    Raises:
        SystemExit: ``1`` when a cell failed (after writing the report of the others and printing the
            first failure and where every failed cell's ``error.txt`` is).
    """
    args = build_parser().parse_args(argv)
    threads = args.threads or None
    if args.run_cell:
        run_cell(args.run_cell, threads=threads)
        return None
    if not args.config:
        build_parser().error("--config is required (e.g. examples/configs/sweep_digits.yaml)")
    try:
        cluster = ClusterSettings(
            cluster=args.cluster,
            partition=args.slurm_partition,
            time_limit_min=args.time_limit,
            gpus_per_cell=args.gpus_per_cell,
            nodes_per_cell=args.nodes_per_cell,
        )
    except ValueError as err:
        build_parser().error(str(err))
    result = run_sweep(
        args.config,
        args.out,
        methods=args.methods,
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
        epochs=parse_epochs(args.epochs),
        base_batch_size=args.base_batch_size,
        executor=args.executor,
        cluster=cluster,
        threads=threads,
        workers=args.workers,
        metric=args.metric,
        plot=not args.no_plot,
    )
    counts = {s: sum(1 for v in result.status.values() if v == s) for s in ("ran", "skipped", "failed")}
    print(f"[sweep] {counts} in {result.wall_s:.1f} s; table: {result.files.get('table')}")
    print(Path(result.files["table"]).read_text())
    failed = [name for name, status in result.status.items() if status == "failed"]
    if failed:
        report_failures(Path(args.out), failed)
        raise SystemExit(1)
    return result


def report_failures(out: Path, failed: Sequence[str], tail_lines: int = 20) -> None:
    """Print, to stderr, the end of the first failed cell's ``error.txt`` and the path of every
    failed cell's ``error.txt`` (the cells run again when the sweep is resumed)."""
    errors = [out / "cells" / name / "error.txt" for name in failed]
    first = errors[0].read_text().rstrip().splitlines()[-tail_lines:] if errors[0].is_file() else ["(no error.txt)"]
    print(f"[sweep] {len(failed)} of the cells failed; the first, {failed[0]}, with:", file=sys.stderr)
    print("\n".join(f"    {line}" for line in first), file=sys.stderr)
    print("[sweep] the errors of the failed cells (rerun the same command to retry them):", file=sys.stderr)
    print("\n".join(f"    {path}" for path in errors), file=sys.stderr)


def console_main() -> None:
    """Console-script entry (returns nothing, so the exit status is 0 on success; 1 when a cell failed)."""
    main()
