"""Small-batch study on offline MNIST (docs/reproduction.md, section 1), in the papers' per-device
setting: at a fixed global batch and one lr, does BN degrade as the per-device batch shrinks, and
does BGN hold?

The BGN paper's "batch 2" is per GPU: the statistics of each layer see 2 examples, while the
gradient averages the global batch (8 GPUs x 2) and the lr follows the global batch. Every cell here
trains on global batches of :data:`GLOBAL_BATCH` = 16 with the same lr (0.2 at batch 64, scaled
linearly: 0.05) and the same cosine schedule; only ``norm.virtual_devices`` changes: with a
per-device batch ``b`` each replaced layer computes its batch statistics separately on the
``16 / b`` consecutive chunks of ``b`` examples, exactly what ``16 / b`` DDP processes with
per-process statistics compute (docs/methods.md, "Virtual devices"). Each cell is one ordinary
normlightning run of ``examples/configs/study_mnist.yaml`` (the CLI and its ``norm:`` injection),
built by :func:`normlightning.sweep.cell_config`, validated on the 1,000 validation images after
every epoch (the training curves) and tested on the 2,000 test images in eval mode (running
statistics) at the end.

Parts of the study (``--parts``):

- ``main``: :data:`METHODS` x per-device batch :data:`PER_DEVICE` x :data:`SEEDS`, :data:`EPOCHS`
  epochs. ``bgn`` and ``seqnorm`` take their ``auto`` group counts, computed from the per-device
  batch (BGN: the paper's mapping, ``G = 1`` at 2). ``gn`` has no batch statistics, so its cells
  are the same at every per-device batch: it runs once per seed (per-device batch 16);
- ``groups``: BGN with a fixed ``G`` (:data:`GROUPS`, fitted per layer, ``group_fit: nearest``)
  at per-device batch 2, :data:`GROUP_SEEDS`: where the best ``G`` lies;
- ``lr``: the lr x :data:`LR_SCALES` for the methods that learn slowest at per-device batch 2
  (:data:`LR_METHODS`), :data:`LR_SEEDS`: do the conclusions hinge on one lr?
- ``long``: :data:`LONG_METHODS` at per-device batch 2 and 16 with :data:`LONG_EPOCHS` epochs
  (first seed): how far the ``main`` length is from the end point;
- ``ddp``: :data:`DDP_METHODS` at per-device batch 2 with 2 real DDP processes (gloo, CPU), each
  with 4 virtual devices (per-process batch 8), :data:`DDP_SEEDS`: the same setting as the
  one-process ``main`` cells through the real launcher. The numbers are not bit-identical to
  ``main``'s: DDP's sampler deals the examples to the ranks in another order, and the ranks'
  running statistics are rank 0's (DDP broadcasts buffers) instead of the mean of the chunks.

Cells run seed by seed (all parts of seed 0 first), so a cut-short study is still balanced.
Resumable: a cell whose ``result.json`` holds the same spec is not run again. Layout of ``--out``::

    cells/<part>/<cell>/{cell.yaml, spec.json, logs/metrics.csv, result.json}
    results.csv        one row per finished cell
    curves.csv         one row per finished cell and epoch (validation and training accuracy)

Run (the report then reads the CSVs; see ``examples/small_batch_study_report.py``)::

    python examples/small_batch_study.py --out runs/reproduction/study --workers 2
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from normlightning import sweep

CONFIG = Path(__file__).resolve().parent / "configs" / "study_mnist.yaml"
GLOBAL_BATCH = 16
BASE_BATCH_SIZE = 64  # the lr of study_mnist.yaml (0.2) holds at batch 64; linear scaling gives 0.05 at 16
TRAIN_IMAGES = 2000  # the training split of study_mnist.yaml (5,000 x (1 - 0.2 - 0.4))
METHODS = ["bn", "bgn", "gn", "seqnorm", "hn", "sn"]
PER_DEVICE = [2, 4, 8, 16]
SEEDS = [0, 1, 2, 3, 4]
EPOCHS = 10
#: G of the BGN sweep at per-device batch 2 (powers of four, ``group_fit: nearest`` fits them per layer);
#: G = 1 is the paper mapping at 2, the ``main`` cells of ``bgn``.
GROUPS = [4, 16, 64, 256]
GROUP_SEEDS = [0, 1, 2]
LR_METHODS = ["bn", "bgn"]
LR_SCALES = [0.5, 2.0]
LR_SEEDS = [0, 1]
LONG_METHODS = ["bn", "bgn"]
LONG_EPOCHS = 20
DDP_METHODS = ["bn", "bgn"]
DDP_SEEDS = [0, 1]
DDP_PROCESSES = 2
MODEL = {"depth": 8, "base_width": 8}
PARTS = ("main", "groups", "lr", "long", "ddp")
#: environment variables of a launched DDP rank; a cell's own launch must not inherit them
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR")


@dataclass(frozen=True)
class StudyCell:
    """One run: ``method`` (``groups`` set: BGN with that fixed G) with statistics over ``per_device``
    examples, on global batches of :data:`GLOBAL_BATCH` split over ``processes`` DDP processes."""

    part: str
    method: str
    per_device: int
    seed: int
    epochs: int
    groups: int | None = None
    lr_scale: float = 1.0
    processes: int = 1

    @property
    def label(self) -> str:
        """``bn``, ``bgn-g16``, ``bn-lr0.5``: the row of the tables."""
        label = self.method if self.groups is None else f"{self.method}-g{self.groups}"
        return label if self.lr_scale == 1.0 else f"{label}-lr{self.lr_scale:g}"

    @property
    def name(self) -> str:
        """Folder ``<part>/<label>_d<per_device>_s<seed>``."""
        return f"{self.part}/{self.label}_d{self.per_device}_s{self.seed}"

    @property
    def virtual_devices(self) -> int:
        """``norm.virtual_devices`` of each process: its batch over the per-device batch."""
        return GLOBAL_BATCH // (self.processes * self.per_device)


def has_batch_statistics(method: str) -> bool:
    """Whether ``method``'s layer normalizes over the batch (else the per-device batch changes nothing)."""
    from normlightning.norms import build_norm

    kwargs = {"num_groups": 1} if method == "bgn" else {}
    if method == "seqnorm":
        kwargs = {"channel_groups": 1, "batch_groups": 1}
    return bool(build_norm(method, 64, **kwargs).uses_batch_statistics)


def study_cells(
    parts: Sequence[str] = PARTS,
    *,
    methods: Sequence[str] = METHODS,
    per_device: Sequence[int] = PER_DEVICE,
    seeds: Sequence[int] = SEEDS,
    epochs: int = EPOCHS,
    groups: Sequence[int] = GROUPS,
    group_seeds: Sequence[int] = GROUP_SEEDS,
    lr_seeds: Sequence[int] = LR_SEEDS,
    long_epochs: int = LONG_EPOCHS,
    ddp_seeds: Sequence[int] = DDP_SEEDS,
) -> list[StudyCell]:
    """The cells of ``parts``, seed by seed (every part of the first seed first); ``long`` last."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"small_batch_study: unknown parts {unknown}; choose from {list(PARTS)}")
    bad = [b for b in per_device if b < 1 or GLOBAL_BATCH % b]
    if "ddp" in parts and per_device and GLOBAL_BATCH % (DDP_PROCESSES * min(per_device)):
        bad.append(min(per_device))
    if bad:
        raise ValueError(
            f"small_batch_study: per-device batches {bad} do not divide the global batch {GLOBAL_BATCH} "
            f"(over {DDP_PROCESSES} processes for the ddp part); choose divisors of {GLOBAL_BATCH}"
        )
    smallest = min(per_device)
    cells: list[StudyCell] = []
    for seed in seeds:
        if "main" in parts:
            for b in per_device:
                cells += [
                    StudyCell("main", m, b, seed, epochs)
                    for m in methods
                    if has_batch_statistics(m) or b == GLOBAL_BATCH
                ]
        if "groups" in parts and seed in group_seeds:
            cells += [StudyCell("groups", "bgn", smallest, seed, epochs, g) for g in groups]
        if "lr" in parts and seed in lr_seeds:
            cells += [StudyCell("lr", m, smallest, seed, epochs, lr_scale=s) for m in LR_METHODS for s in LR_SCALES]
        if "ddp" in parts and seed in ddp_seeds:
            cells += [StudyCell("ddp", m, smallest, seed, epochs, processes=DDP_PROCESSES) for m in DDP_METHODS]
    if "long" in parts:
        cells += [
            StudyCell("long", m, b, seeds[0], long_epochs) for m in LONG_METHODS for b in (smallest, GLOBAL_BATCH)
        ]
    return cells


def cell_config(base: Mapping[str, Any], cell: StudyCell, cell_dir: Path) -> dict[str, Any]:
    """:func:`normlightning.sweep.cell_config` of the cell at the per-process batch, plus its virtual devices,
    its fixed BGN G (``groups`` part), its lr scale, validation after every epoch and, for DDP cells, the
    processes."""
    config = sweep.cell_config(
        base,
        sweep.Cell(cell.method, GLOBAL_BATCH // cell.processes, cell.seed),
        epochs=cell.epochs,
        base_batch_size=BASE_BATCH_SIZE,
        cell_dir=cell_dir,
    )
    config["model"]["init_args"]["backbone_kwargs"] = dict(MODEL)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] *= cell.lr_scale
    if cell.groups is not None:
        config["norm"] = {"method": "bgn", "num_groups": cell.groups, "group_fit": "nearest"}
    config["norm"]["virtual_devices"] = cell.virtual_devices
    config["trainer"].update({"limit_val_batches": 1.0, "num_sanity_val_steps": 0})
    if cell.processes > 1:
        config["trainer"].update({"devices": cell.processes, "strategy": "ddp"})
    return config


def cell_spec(cell: StudyCell, config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a finished cell: its fields and a hash of its config (without paths)."""
    stable = copy.deepcopy(dict(config))
    stable.get("trainer", {}).pop("logger", None)
    stable.get("checkpoint", {}).pop("dirpath", None)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**asdict(cell), "config_sha256": digest}


# ----------------------------------------------------------------------------- one cell
def read_curves(path: str | os.PathLike) -> list[dict[str, float]]:
    """Per epoch of a ``metrics.csv``: ``{epoch, step, val_acc1, train_acc1}`` (the epoch-level values)."""
    epochs: dict[int, dict[str, float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            entry = epochs.setdefault(int(row["epoch"]), {"epoch": int(row["epoch"])})
            for column, key in (("val/acc1", "val_acc1"), ("train/acc1", "train_acc1")):
                if row.get(column):
                    entry[key] = float(row[column])
                    entry["step"] = int(row["step"])
    return [epochs[e] for e in sorted(epochs) if "val_acc1" in epochs[e]]


def fit_and_test(cell_dir: Path, threads: int | None = 1) -> dict[str, Any] | None:
    """Train and test the cell of ``cell_dir/cell.yaml`` in this process (or, under DDP, in this rank);
    rank 0 writes ``result.json`` and returns it."""
    import torch

    from normlightning.cli import build_cli
    from normlightning.injection import get_spec

    if threads is not None:
        torch.set_num_threads(threads)
    spec = json.loads((cell_dir / "spec.json").read_text())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    cli = build_cli(["--config", str(cell_dir / sweep.CONFIG_FILE)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    group = cli.trainer.optimizers[0].param_groups[0]
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    if cli.trainer.global_rank != 0:
        return None
    logged = sweep.read_last_metrics(cell_dir / sweep.METRICS_FILE)
    if "test/acc1" not in logged:
        raise RuntimeError(f"{cell_dir}: no test/acc1 in {sweep.METRICS_FILE}")
    injected = get_spec(cli.model) or {"layers": []}
    result = {
        "status": "ok",
        "spec": spec,
        "test_acc1": logged["test/acc1"],
        "curves": read_curves(cell_dir / sweep.METRICS_FILE),
        "layer_groups": {r["name"]: r["kwargs"].get("num_groups") for r in injected["layers"]},
        "lr": float(group.get("initial_lr", group["lr"])),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }
    (cell_dir / sweep.RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    return result


def run_cell(cell_dir: str | os.PathLike, threads: int | None = 1) -> dict[str, Any]:
    """Run one cell: in this process, or (``processes > 1``) through Lightning's DDP launcher in a child
    process (its CPU time, every rank's, is recorded); return its ``result.json``."""
    cell_dir = Path(cell_dir)
    (cell_dir / sweep.METRICS_FILE).unlink(missing_ok=True)
    spec = json.loads((cell_dir / "spec.json").read_text())
    if spec["processes"] == 1:
        result = fit_and_test(cell_dir, threads)
        assert result is not None
        return result
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PL_DISABLE_FORK="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--run-cell", str(cell_dir.resolve())],
        cwd=cell_dir,
        env=env,
        capture_output=True,
        text=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (cell_dir / "ddp.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{cell_dir}: DDP cell exited {proc.returncode}; see {cell_dir / 'ddp.log'}")
    result = json.loads((cell_dir / sweep.RESULT_FILE).read_text())
    result["wall_s"] = time.perf_counter() - wall0
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    (cell_dir / sweep.RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    return result


def _attempt(cell_dir: Path, threads: int | None) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        run_cell(cell_dir, threads)
    except Exception:  # noqa: BLE001 - one failed cell must not stop the study
        (cell_dir / "error.txt").write_text(traceback.format_exc())
        return "failed", time.perf_counter() - t0
    return "ran", time.perf_counter() - t0


# ----------------------------------------------------------------------------- the study
def run_study(
    out_dir: str | os.PathLike,
    cells: Sequence[StudyCell],
    *,
    base_config: Mapping[str, Any] | str | os.PathLike = CONFIG,
    workers: int = 1,
    threads: int | None = 1,
    log: Any = print,
) -> dict[str, Any]:
    """Run (or resume) ``cells`` under ``out_dir``; write ``results.csv`` and ``curves.csv``; return
    ``{status, rows, wall_s}``."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"small_batch_study: workers must be a positive int, got {workers!r}")
    log = log or (lambda *a, **k: None)
    if not isinstance(base_config, Mapping):
        base_config = yaml.safe_load(Path(base_config).read_text())
    out = Path(out_dir)
    status: dict[str, str] = {}
    pending: list[Path] = []
    for cell in cells:
        cell_dir = out / "cells" / cell.name
        config = cell_config(base_config, cell, cell_dir)
        spec = cell_spec(cell, config)
        if _finished(cell_dir, spec):
            status[cell.name] = "skipped"
            continue
        cell_dir.mkdir(parents=True, exist_ok=True)
        for stale in (sweep.RESULT_FILE, "error.txt"):
            (cell_dir / stale).unlink(missing_ok=True)
        (cell_dir / sweep.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        (cell_dir / "spec.json").write_text(json.dumps(spec))
        pending.append(cell_dir)
    log(f"[study] {len(pending)} of {len(cells)} cells to run", flush=True)
    start = time.perf_counter()
    if workers == 1:
        for i, cell_dir in enumerate(pending, 1):
            state, seconds = _attempt(cell_dir, threads)
            status[_name(out, cell_dir)] = state
            log(f"[study] {i}/{len(pending)} {_name(out, cell_dir)} {state} in {seconds:.1f} s", flush=True)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_attempt, d, threads): d for d in pending}
            for i, future in enumerate(futures, 1):
                state, seconds = future.result()
                status[_name(out, futures[future])] = state
                log(f"[study] {i}/{len(pending)} {_name(out, futures[future])} {state} in {seconds:.1f} s", flush=True)
    results = [(cell, _stored(out, cell)) for cell in cells]
    results = [(cell, stored) for cell, stored in results if stored is not None]
    rows = [result_row(cell, stored) for cell, stored in results]
    write_csv(out / "results.csv", ROW_FIELDS, rows)
    write_csv(out / "curves.csv", CURVE_FIELDS, [r for cell, stored in results for r in curve_rows(cell, stored)])
    return {"status": status, "rows": rows, "wall_s": time.perf_counter() - start}


def _name(out: Path, cell_dir: Path) -> str:
    return cell_dir.relative_to(out / "cells").as_posix()


def _finished(cell_dir: Path, spec: Mapping[str, Any]) -> bool:
    try:
        stored = json.loads((cell_dir / sweep.RESULT_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return stored.get("status") == "ok" and stored.get("spec") == dict(spec)


def _stored(out: Path, cell: StudyCell) -> dict[str, Any] | None:
    path = out / "cells" / cell.name / sweep.RESULT_FILE
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return stored if stored.get("status") == "ok" else None


ROW_FIELDS = [
    "part",
    "method",
    "label",
    "groups",
    "per_device",
    "virtual_devices",
    "processes",
    "lr_scale",
    "seed",
    "epochs",
    "lr",
    "wall_s",
    "cpu_s",
    "test_acc1",
    "val_acc1",
    "train_acc1",
    "layer_groups",
]
CURVE_FIELDS = ["part", "label", "per_device", "seed", "epoch", "step", "val_acc1", "train_acc1"]


def result_row(cell: StudyCell, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The ``results.csv`` row of a finished cell (final validation and training accuracy from its curve)."""
    last = stored["curves"][-1] if stored["curves"] else {}
    return {
        **asdict(cell),
        "label": cell.label,
        "virtual_devices": cell.virtual_devices,
        "lr": stored["lr"],
        "wall_s": stored["wall_s"],
        "cpu_s": stored["cpu_s"],
        "test_acc1": stored["test_acc1"],
        "val_acc1": last.get("val_acc1"),
        "train_acc1": last.get("train_acc1"),
        "layer_groups": json.dumps(stored["layer_groups"]),
    }


def curve_rows(cell: StudyCell, stored: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``curves.csv`` rows of a finished cell, one per epoch."""
    return [
        {"part": cell.part, "label": cell.label, "per_device": cell.per_device, "seed": cell.seed, **point}
        for point in stored["curves"]
    ]


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV with the columns ``fields``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


TEXT_FIELDS = ("part", "method", "label", "layer_groups")
INT_FIELDS = ("groups", "per_device", "virtual_devices", "processes", "seed", "epochs", "epoch", "step")


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` or ``curves.csv`` with numbers parsed (empty fields dropped)."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                if key in TEXT_FIELDS:
                    row[key] = value
                else:
                    row[key] = int(float(value)) if key in INT_FIELDS else float(value)
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-device small-batch normalization study on offline MNIST")
    parser.add_argument("--out", default="runs/reproduction/study")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--per-device", nargs="+", type=int, default=PER_DEVICE)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of the main, groups, lr and ddp cells")
    parser.add_argument("--long-epochs", type=int, default=LONG_EPOCHS, help="epochs of the 'long' cells")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once (worker processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study; exits with status 1 (after writing the CSVs of the finished cells) if a cell failed."""
    args = build_parser().parse_args(argv)
    cells = study_cells(
        args.parts,
        methods=args.methods,
        per_device=args.per_device,
        seeds=args.seeds,
        epochs=args.epochs,
        long_epochs=args.long_epochs,
    )
    result = run_study(args.out, cells, workers=args.workers, threads=args.threads)
    counts = {s: sum(1 for v in result["status"].values() if v == s) for s in ("ran", "skipped", "failed")}
    print(f"[study] {counts} in {result['wall_s']:.1f} s; results: {Path(args.out) / 'results.csv'}")
    if counts["failed"]:
        failed = [name for name, state in result["status"].items() if state == "failed"]
        raise SystemExit(f"[study] {counts['failed']} cell(s) failed (error.txt in each): {failed}")
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run-cell"]:  # one DDP cell: every rank runs this (Lightning relaunches the command)
        fit_and_test(Path(sys.argv[2]))
    else:
        main()
