"""Small-batch study on offline MNIST (docs/reproduction.md, section 1): which normalization
holds at batch 2, why, and which BGN group count fits which batch.

Every cell is one ordinary normlightning run of ``examples/configs/study_mnist.yaml`` (the
CLI, the ``norm:`` injection, SGD with the LR scaled linearly from 0.2 at batch 64, a cosine
schedule, ``drop_last``), built by :func:`normlightning.sweep.cell_config`, trained with
``trainer.fit`` and then measured on the 2,000 test images (:func:`measure_inference_modes`):

- ``acc_running``: eval mode, running statistics (what ``trainer.test`` reports);
- ``acc_batch``: the test set cut into batches of the *training* batch size, each normalized
  with its own batch statistics (``statistics_mode(model, "train_frozen")``);
- ``acc_recalibrated``: running statistics recomputed as an equal-weight average over one
  pass of the training set at the training batch size (:func:`recalibrate_statistics`);
- ``acc_alpha``: running statistics with Four Things' inference example weighing, ``alpha``
  chosen on the 1,000 validation images (:func:`search_example_weighing`; bn, ghost, gbgn).

The batch-independent methods (gn, ln, in, pn) get ``acc_running`` only.

Parts of the study (``--parts``):

- ``grid``: 12 methods x per-process batch 2, 4, 16, 64 x seeds, the same ``--epochs`` for all
  (the papers' protocol), ResNet-8 of width 8 (``cifar_resnet``, depth 8, base_width 8);
- ``groups``: BGN with a fixed ``G`` (fitted per layer, ``group_fit: nearest``) at batch 2 and
  64 (BGN paper, Table 1), same model and epochs;
- ``groups_wide``: the batch-64 G sweep on ResNet-8 of width 16 (twice the elements per layer),
  to see whether the best G follows the batch size or the number of elements per set;
- ``long``: every method at batch 64 with ``--long-epochs`` (one seed): the accuracy a batch-64
  run reaches when it has settled, next to the equal-epoch grid.

Cells run seed by seed (the grid and G sweep of seed 0 first), so a cut-short study is still
balanced.
Resumable: a cell whose ``result.json`` holds the same spec is not run again. Layout of ``--out``::

    cells/<part>/<cell>/{cell.yaml, spec.json, metrics.csv, result.json}
    results.csv        one row per finished cell (all measurements)

Run (the report then reads ``results.csv``; see ``examples/small_batch_study_report.py``)::

    python examples/small_batch_study.py --out runs/reproduction/study --workers 2
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from normlightning import sweep

CONFIG = Path(__file__).resolve().parent / "configs" / "study_mnist.yaml"
#: ``brn-scaled`` is BRN with its r/d schedule scaled to the run (:func:`brn_scaled_norm`); ``brn``
#: keeps the paper's step counts, whose 5,000-step warm-up (r_max = 1, d_max = 0: plain BN) is
#: longer than every run here.
METHODS = ["bn", "gn", "ln", "in", "pn", "ghost", "seqnorm", "bgn", "gbgn", "hn", "sn", "brn", "brn-scaled"]
TRAIN_IMAGES = 2000  # the training split of study_mnist.yaml (5,000 x (1 - 0.2 - 0.4))
BATCH_SIZES = [2, 4, 16, 64]
SEEDS = [0, 1, 2]
EPOCHS = 4
LONG_EPOCHS = 16
BASE_BATCH_SIZE = 64
#: G of the BGN sweep at each batch (powers of two; ``group_fit: nearest`` fits them per layer).
GROUPS = {2: [1, 4, 16, 64, 256], 64: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]}
GROUPS_WIDE = {64: [1, 4, 16, 64, 256, 1024]}
MODEL = {"depth": 8, "base_width": 8}
MODEL_WIDE = {"depth": 8, "base_width": 16}
PARTS = ("grid", "groups", "groups_wide", "long")
MEASURES = ("acc_running", "acc_batch", "acc_recalibrated", "acc_alpha")


@dataclass(frozen=True)
class StudyCell:
    """One run: ``method`` (``groups`` set: BGN with that fixed G) at ``batch_size``, ``seed``."""

    part: str
    method: str
    batch_size: int
    seed: int
    epochs: int
    groups: int | None = None
    depth: int = MODEL["depth"]
    base_width: int = MODEL["base_width"]

    @property
    def label(self) -> str:
        """``bn`` or ``bgn-g32``: the row of the tables."""
        return self.method if self.groups is None else f"{self.method}-g{self.groups}"

    @property
    def name(self) -> str:
        """Folder ``<part>/<label>_b<B>_s<seed>``."""
        return f"{self.part}/{self.label}_b{self.batch_size}_s{self.seed}"


def study_cells(
    parts: Sequence[str] = PARTS,
    *,
    methods: Sequence[str] = METHODS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seeds: Sequence[int] = SEEDS,
    epochs: int = EPOCHS,
    long_epochs: int = LONG_EPOCHS,
    groups: Mapping[int, Sequence[int]] = GROUPS,
    groups_wide: Mapping[int, Sequence[int]] = GROUPS_WIDE,
) -> list[StudyCell]:
    """The cells of ``parts``: ``grid`` and ``groups`` seed by seed (both parts of the first seed
    first), then ``groups_wide``, then ``long`` (first seed only)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"small_batch_study: unknown parts {unknown}; choose from {list(PARTS)}")
    sweep.make_grid([m for m in methods if m != "brn-scaled"] or ["bn"], batch_sizes, seeds)  # checks the axes
    cells: list[StudyCell] = []
    for seed in seeds:
        if "grid" in parts:
            cells += [StudyCell("grid", m, b, seed, epochs) for b in batch_sizes for m in methods]
        if "groups" in parts:
            cells += [StudyCell("groups", "bgn", b, seed, epochs, g) for b, gs in groups.items() for g in gs]
    if "groups_wide" in parts:
        cells += [
            StudyCell("groups_wide", "bgn", b, seed, epochs, g, **MODEL_WIDE)
            for seed in seeds
            for b, gs in groups_wide.items()
            for g in gs
        ]
    if "long" in parts:
        cells += [StudyCell("long", m, BASE_BATCH_SIZE, seeds[0], long_epochs) for m in methods]
    return cells


def brn_scaled_norm(total_steps: int) -> dict[str, Any]:
    """``norm:`` section of BRN with the paper's schedule (r_max 1 -> 3 over steps 5k -> 40k, d_max
    0 -> 5 over 5k -> 25k) compressed so that it ends at half of a run of ``total_steps``:
    both ramps start at ``T/16``; r_max reaches 3 at ``T/2``, d_max reaches 5 at ``5T/16``."""
    start = total_steps // 16
    return {
        "method": "brn",
        "kwargs": {
            "r_max_start_step": start,
            "r_max_end_step": total_steps // 2,
            "d_max_start_step": start,
            "d_max_end_step": 5 * total_steps // 16,
        },
    }


def cell_config(base: Mapping[str, Any], cell: StudyCell, cell_dir: Path) -> dict[str, Any]:
    """:func:`normlightning.sweep.cell_config` of the cell, with its model and (G sweep) its BGN G."""
    method = "brn" if cell.method == "brn-scaled" else cell.method
    config = sweep.cell_config(
        base,
        sweep.Cell(method, cell.batch_size, cell.seed),
        epochs=cell.epochs,
        base_batch_size=BASE_BATCH_SIZE,
        cell_dir=cell_dir,
    )
    config["model"]["init_args"]["backbone_kwargs"] = {"depth": cell.depth, "base_width": cell.base_width}
    if cell.groups is not None:
        config["norm"] = {"method": "bgn", "num_groups": cell.groups, "group_fit": "nearest"}
    if cell.method == "brn-scaled":
        config["norm"] = brn_scaled_norm(cell.epochs * (TRAIN_IMAGES // cell.batch_size))
    return config


def cell_spec(cell: StudyCell, config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a finished cell: its fields and a hash of its config (without paths)."""
    stable = copy.deepcopy(dict(config))
    stable.get("trainer", {}).pop("logger", None)
    stable.get("checkpoint", {}).pop("dirpath", None)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**asdict(cell), "config_sha256": digest}


# ----------------------------------------------------------------------------- measuring
def measure_inference_modes(model: Any, datamodule: Any, batch_size: int) -> dict[str, Any]:
    """Test accuracy of the trained ``model`` under the four inference modes of the module docstring.

    Leaves the model as it found it (running statistics restored, ``alpha`` back to 0).
    """
    from torch.utils.data import DataLoader

    from normlightning.callbacks.example_weighing import (
        example_weighing_layers,
        search_example_weighing,
        set_example_weighing_alpha,
    )
    from normlightning.callbacks.recalibration import (
        batch_statistic_layers,
        default_forward,
        evaluate_accuracy,
        recalibrate_statistics,
    )
    from normlightning.norms.model_walk import statistics_mode

    test = datamodule.test_dataloader()
    out: dict[str, Any] = {"acc_running": evaluate_accuracy(model, test)}
    if not batch_statistic_layers(model):
        return out

    def batch_statistics_forward(m: Any, batch: Any) -> Any:
        with statistics_mode(m, "train_frozen"):
            return default_forward(m, batch)

    test_at_b = DataLoader(test.dataset, batch_size=batch_size, shuffle=False)
    out["acc_batch"] = evaluate_accuracy(model, test_at_b, batch_statistics_forward)
    if example_weighing_layers(model):
        found = search_example_weighing(model, datamodule.val_dataloader(), batch_size=batch_size)
        out["acc_alpha"] = evaluate_accuracy(model, test)
        out["alpha"] = found.best_alpha
        set_example_weighing_alpha(model, 0.0)
    saved = copy.deepcopy(model.state_dict())
    out["recalibration_batches"] = recalibrate_statistics(model, datamodule.train_dataloader())
    out["acc_recalibrated"] = evaluate_accuracy(model, test)
    model.load_state_dict(saved)
    return out


def run_cell(cell_dir: str | os.PathLike, threads: int | None = 1) -> dict[str, Any]:
    """Train the cell of ``cell_dir/cell.yaml``, measure it, write ``result.json``; return it."""
    import torch

    from normlightning.cli import build_cli
    from normlightning.injection import get_spec

    cell_dir = Path(cell_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    spec = json.loads((cell_dir / "spec.json").read_text())
    wall0, cpu0 = time.perf_counter(), time.process_time()
    (cell_dir / sweep.METRICS_FILE).unlink(missing_ok=True)
    cli = build_cli(["--config", str(cell_dir / sweep.CONFIG_FILE)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    group = cli.trainer.optimizers[0].param_groups[0]
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    logged = sweep.read_last_metrics(cell_dir / sweep.METRICS_FILE)
    measured = measure_inference_modes(cli.model, cli.datamodule, spec["batch_size"])
    injected = get_spec(cli.model) or {"layers": []}
    result = {
        "status": "ok",
        "spec": spec,
        "metrics": {k: logged[k] for k in ("test/acc1", "train/acc1") if k in logged},
        "measured": measured,
        "layer_groups": {r["name"]: r["kwargs"].get("num_groups") for r in injected["layers"]},
        "lr": float(group.get("initial_lr", group["lr"])),
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }
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
    """Run (or resume) ``cells`` under ``out_dir``; write ``results.csv``; return ``{status, rows}``."""
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
    rows = collect_rows(out, cells)
    write_results(out / "results.csv", rows)
    return {"status": status, "rows": rows, "wall_s": time.perf_counter() - start}


def _name(out: Path, cell_dir: Path) -> str:
    return cell_dir.relative_to(out / "cells").as_posix()


def _finished(cell_dir: Path, spec: Mapping[str, Any]) -> bool:
    try:
        stored = json.loads((cell_dir / sweep.RESULT_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return stored.get("status") == "ok" and stored.get("spec") == dict(spec)


ROW_FIELDS = [
    "part",
    "method",
    "label",
    "groups",
    "depth",
    "base_width",
    "batch_size",
    "seed",
    "epochs",
    "lr",
    "wall_s",
    "cpu_s",
    "test_acc1_logged",
    "train_acc1",
    *MEASURES,
    "alpha",
    "layer_groups",
]


def collect_rows(out_dir: Path, cells: Sequence[StudyCell]) -> list[dict[str, Any]]:
    """One flat row per finished cell (fields :data:`ROW_FIELDS`; a measure a method lacks is absent)."""
    rows = []
    for cell in cells:
        path = Path(out_dir) / "cells" / cell.name / sweep.RESULT_FILE
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        if stored.get("status") != "ok":
            continue
        rows.append(
            {
                **asdict(cell),
                "label": cell.label,
                "lr": stored["lr"],
                "wall_s": stored["wall_s"],
                "cpu_s": stored["cpu_s"],
                "test_acc1_logged": stored["metrics"].get("test/acc1"),
                "train_acc1": stored["metrics"].get("train/acc1"),
                **stored["measured"],
                "layer_groups": json.dumps(stored["layer_groups"]),
            }
        )
    return rows


def write_results(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``results.csv`` with the columns :data:`ROW_FIELDS`."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` with numbers parsed (empty fields dropped)."""
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                if key in ("part", "method", "label", "layer_groups"):
                    row[key] = value
                else:
                    number = float(value)
                    row[key] = (
                        int(number)
                        if key in ("groups", "depth", "base_width", "batch_size", "seed", "epochs")
                        else number
                    )
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Small-batch normalization study on offline MNIST (resumable)")
    parser.add_argument("--out", default="runs/reproduction/study")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=BATCH_SIZES)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs of every grid and G-sweep cell")
    parser.add_argument("--long-epochs", type=int, default=LONG_EPOCHS, help="epochs of the 'long' batch-64 cells")
    parser.add_argument("--workers", type=int, default=1, help="cells run at once (worker processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cells = study_cells(
        args.parts,
        methods=args.methods,
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
        epochs=args.epochs,
        long_epochs=args.long_epochs,
    )
    result = run_study(args.out, cells, workers=args.workers, threads=args.threads)
    counts = {s: sum(1 for v in result["status"].values() if v == s) for s in ("ran", "skipped", "failed")}
    print(f"[study] {counts} in {result['wall_s']:.1f} s; results: {Path(args.out) / 'results.csv'}")
    return result


if __name__ == "__main__":
    main()
