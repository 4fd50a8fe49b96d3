"""The grid of a batch-size sweep: its cells, each method's ``norm:`` preset, and the full
config one cell runs with.

A cell ``(method, B, seed)`` is the base config (any ``normlightning fit`` config) with the keys
listed in :func:`cell_config` overridden; :func:`cell_spec` is what identifies a finished cell.
Layout of a sweep folder: ``cells/<method>_b<B>_s<seed>/`` holds :data:`CONFIG_FILE`,
:data:`SPEC_FILE`, the run's logs in :data:`LOGS_DIR` (:data:`METRICS_FILE`) and, written last,
:data:`RESULT_FILE`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "FIXED_GROUP_COUNTS",
    "LOGS_DIR",
    "METRICS_FILE",
    "RESULT_FILE",
    "RESULT_METRICS",
    "SPEC_FILE",
    "TENSORBOARD_DIR",
    "Cell",
    "cell_config",
    "cell_spec",
    "epochs_per_batch",
    "make_grid",
    "method_preset",
]

RESULT_FILE = "result.json"
CONFIG_FILE = "cell.yaml"
SPEC_FILE = "spec.json"
#: The cell's log folder (a fresh one for every attempt: the CSV logger never finds old files).
LOGS_DIR = "logs"
METRICS_FILE = f"{LOGS_DIR}/metrics.csv"
#: The cell's TensorBoard events and hparams (HParams view beside single runs), inside :data:`LOGS_DIR`.
TENSORBOARD_DIR = f"{LOGS_DIR}/tensorboard"
#: Metrics copied from each cell's logs into ``results.csv`` (the last logged value of each): ``train/loss`` is
#: the loss of the last training batch (the task logs it at each epoch's last batch; it logs no epoch mean).
RESULT_METRICS = ("test/acc1", "test/loss", "val/acc1", "val/loss", "train/loss")

#: The sweep's own choice for group counts that have no ``auto`` rule, chosen for narrow conv
#: nets (16-64 channels): ``gn`` 8 groups; ``gbgn`` 8 channel groups and contiguous groups of
#: 16 examples. Every declared count with an ``auto`` rule gets ``"auto"`` instead
#: (:func:`method_preset`).
FIXED_GROUP_COUNTS: dict[str, dict[str, int]] = {
    "gn": {"num_groups": 8},
    "gbgn": {"channel_groups": 8, "examples_per_group": 16},
}


def method_preset(method: str) -> dict[str, Any]:
    """The ``norm:`` section of ``method`` in every cell.

    Every group count that the method declares (``normlightning.norms.norm_group_args``) with an
    ``auto`` rule is ``"auto"`` (``bgn``: the paper's mapping from the batch size; ``ghost``:
    ghost batches of >= 16 examples, so ``ghost`` equals ``bn`` below batch 32; ``seqnorm``:
    4 channel groups and ghost batches), plugins registered with ``register_norm`` included.
    Counts without an ``auto`` rule take :data:`FIXED_GROUP_COUNTS` (or the layer's default).
    A ``num_groups`` count that the injection's ``norm.num_groups`` fills goes there; the others
    go to ``norm.kwargs``. Example: ``method_preset("bgn") == {"method": "bgn", "num_groups": "auto"}``.
    """
    from normlightning.norms import norm_group_args

    counts: dict[str, Any] = {arg.name: "auto" for arg in norm_group_args(method) if arg.auto}
    for name, value in FIXED_GROUP_COUNTS.get(method, {}).items():
        counts.setdefault(name, value)
    preset: dict[str, Any] = {"method": method}
    takes_num_groups = any(arg.name == "num_groups" and arg.takes_num_groups for arg in norm_group_args(method))
    if "num_groups" in counts and takes_num_groups:
        preset["num_groups"] = counts.pop("num_groups")
    if counts:
        preset["kwargs"] = counts
    return preset


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


def make_grid(methods: Sequence[str], batch_sizes: Sequence[int], seeds: Sequence[int]) -> list[Cell]:
    """All cells, method-major then batch then seed; checks the settings.

    Raises:
        ValueError: empty axis, duplicate entries, a batch size < 2 or a method that is not
            registered (``normlightning.norms.available_norms``).
    """
    from normlightning.norms import available_norms

    for axis, values in (("methods", methods), ("batch_sizes", batch_sizes), ("seeds", seeds)):
        if len(values) == 0:
            raise ValueError(f"sweep: {axis} is empty; give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"sweep: {axis} has duplicates: {list(values)}")
    known = set(available_norms())
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


def epochs_per_batch(epochs: int | Mapping[int, int], batch_sizes: Sequence[int]) -> dict[int, int]:
    """``{batch_size: epochs}`` from an int (same for all) or a mapping covering every batch size."""
    table = dict(epochs) if isinstance(epochs, Mapping) else {int(b): epochs for b in batch_sizes}
    missing = [b for b in batch_sizes if b not in table]
    if missing:
        raise ValueError(f"sweep: epochs per batch size misses batch sizes {missing}; give e.g. {{2: 2, 64: 20}}")
    for b, e in table.items():
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"sweep: epochs must be positive ints, got {e!r} for batch size {b}")
    return {int(b): table[b] for b in batch_sizes}


def cell_config(
    base: Mapping[str, Any],
    cell: Cell,
    *,
    epochs: int,
    base_batch_size: int,
    cell_dir: str | os.PathLike,
    gpus: int = 0,
    nodes: int = 1,
) -> dict[str, Any]:
    """The full config of ``cell``: ``base`` with these keys overridden:

    - ``norm``: :func:`method_preset` of the method (the ``NormInjection`` callback);
    - ``data.init_args.batch_size = B`` (per process) and ``drop_last = True`` (no training
      batch of a single example, which batch-statistic layers reject);
    - ``model.init_args.lr_base_batch_size = base_batch_size``: the task scales the optimizer's
      ``lr`` linearly (:mod:`normlightning.training.lr_scaling`, Goyal et al. 2017),
      ``lr = base_lr * B * world_size / base_batch_size``;
    - ``seed_everything = seed`` (weights, data order; the data split keeps its own seed);
    - ``trainer.max_epochs = epochs`` and ``T_max`` of a ``CosineAnnealingLR`` scheduler;
    - a ``CSVLogger`` writing into ``cell_dir/logs`` (read back for ``results.csv``) and a ``TensorBoardLogger``
      into ``cell_dir/logs/tensorboard`` (events and hparams, so that the cells sit in TensorBoard's HParams
      view beside single runs), no progress bar, no checkpoint files;
    - with ``gpus > 0``: ``trainer.accelerator = gpu``, ``devices = gpus / nodes``,
      ``num_nodes = nodes`` and, with more than one GPU, ``strategy = ddp``.

    Args:
        base: a normlightning config (dict, as loaded from YAML) with ``model.init_args.optimizer``
            (``class_path`` + ``init_args.lr``, the LR at ``base_batch_size``) and ``data.init_args``.
        cell: the grid cell.
        epochs: ``trainer.max_epochs``.
        base_batch_size: batch size at which the base config's ``lr`` holds.
        cell_dir: the cell folder (logs go to its ``logs/``).
        gpus, nodes: GPUs of the cell over all its nodes, and its nodes (0: the base config's
            accelerator and devices are kept).

    Raises:
        ValueError: a missing key above, or a base config whose own ``lr_base_batch_size``
            differs from ``base_batch_size``.
    """
    config = copy.deepcopy(dict(base))
    try:
        model_args = config["model"]["init_args"]
        float(model_args["optimizer"]["init_args"]["lr"])
        data_args = config["data"]["init_args"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            "sweep: the base config needs model.init_args.optimizer.init_args.lr (the LR at "
            f"--base-batch-size) and data.init_args; missing {err}"
        ) from None
    own = model_args.get("lr_base_batch_size")
    if own is not None and own != base_batch_size:
        raise ValueError(
            f"sweep: the base config sets model.init_args.lr_base_batch_size={own} but the sweep's "
            f"base_batch_size is {base_batch_size}; remove it from the config or pass --base-batch-size {own}"
        )
    model_args["lr_base_batch_size"] = base_batch_size
    scheduler = model_args.get("lr_scheduler")
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
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(cell_dir), "name": LOGS_DIR, "version": ""},
                },
                {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": str(Path(cell_dir) / TENSORBOARD_DIR),
                        "name": "",
                        "version": "",
                        "default_hp_metric": False,
                    },
                },
            ],
        }
    )
    if gpus:
        trainer.update({"accelerator": "gpu", "devices": gpus // nodes, "num_nodes": nodes})
        if gpus > 1:
            trainer["strategy"] = "ddp"
    # the cell's method comes from the norm: section alone; a NormInjection listed as a callback would inject twice
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if not _is_injection(c)]
    checkpoint = config.setdefault("checkpoint", {})
    checkpoint.update({"save_top_k": 0, "save_last": False, "dirpath": str(Path(cell_dir) / "checkpoints")})
    config["norm"] = method_preset(cell.method)
    return config


def _is_injection(callback: Any) -> bool:
    return isinstance(callback, Mapping) and str(callback.get("class_path", "")).endswith("NormInjection")


def cell_spec(cell: Cell, config: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a finished cell: the cell and a hash of its full config (minus paths)."""
    stable = copy.deepcopy(dict(config))
    stable.get("trainer", {}).pop("logger", None)
    stable.get("checkpoint", {}).pop("dirpath", None)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**asdict(cell), "config_sha256": digest}
