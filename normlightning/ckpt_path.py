"""The ``normlightning`` command's ``--ckpt_path``: what ``last`` means, and the errors that say what to pass.

Each command is a new process whose run gets a new ``version_<n>`` folder, so Lightning's own
``last`` (the ``last.ckpt`` of this run's folder) would find nothing and ``fit`` would start from
scratch. Here:

* ``last`` is the newest ``last.ckpt`` (by modification time) of the run name's folders,
  ``<logger save_dir>/<logger name>/<version>/checkpoints/last.ckpt`` (only the logger's
  ``version`` when it is set; ``<checkpoint.dirpath>/last.ckpt`` when that is set;
  ``<trainer.default_root_dir>/checkpoints/last.ckpt`` without a logger). The command says which
  file it uses; none is an error naming the folders searched.
* ``best`` is an error: it names the best checkpoint of a ``fit`` run earlier in the same Python
  process, and a command has none. The message gives the file form (and the newest ``best-*.ckpt``).
* A directory is an error that lists the ``.ckpt`` files under it.
* A file that a normlightning task did not write (another LightningModule, a bare state_dict) is an
  error naming its class when the file records one (:func:`check_task_checkpoint`).
* A checkpoint whose ``num_classes`` differs from the data's is an error naming both values
  (:func:`check_num_classes`), instead of a ``size mismatch`` of the classifier weights.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from normlightning.tasks.base import BaseTask
from normlightning.training.rng_state import CHECKPOINT_KEY as RNG_CHECKPOINT_KEY

#: ``--ckpt_path`` values that are not local files and that Lightning resolves itself.
LIGHTNING_CKPT_NAMES = ("hpc", "registry")
#: The class every normlightning task derives from.
BASE_TASK = "normlightning.tasks.BaseTask"
#: At most this many files are listed in a message.
LISTED_FILES = 20


class CheckpointPathError(ValueError):
    """A ``--ckpt_path`` that cannot be used as given; the message says what to pass instead."""


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` of a jsonargparse ``Namespace`` or a dict, ``default`` when absent."""
    try:
        value = config[key]
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def run_checkpoint_folders(config: Any) -> tuple[list[Path], str]:
    """The existing checkpoint folders of the run name configured in ``config`` (one subcommand's
    config: ``trainer``, ``checkpoint``), and their path pattern for messages."""
    dirpath = _get(_get(config, "checkpoint", {}), "dirpath")
    if dirpath:
        return [Path(dirpath)], str(dirpath)
    trainer = _get(config, "trainer", {})
    root = Path(_get(trainer, "default_root_dir", "."))
    logger = _get(trainer, "logger", True)
    if isinstance(logger, list):
        logger = logger[0] if logger else False
    if logger is False:
        return [root / "checkpoints"], str(root / "checkpoints")
    if logger is True:  # Lightning's default logger
        base, version = root / "lightning_logs", None
    else:
        init_args = _get(logger, "init_args", {})
        if _get(init_args, "save_dir") is None:  # a logger without a local folder: nothing to search
            return [], "<the logger's run folder>/checkpoints"
        base, version = Path(init_args["save_dir"]) / str(_get(init_args, "name", "")), _get(init_args, "version")
    if version is not None:
        folder = base / (f"version_{version}" if isinstance(version, int) else str(version)) / "checkpoints"
        return [folder], str(folder)
    folders = sorted(path / "checkpoints" for path in base.iterdir() if path.is_dir()) if base.is_dir() else []
    return folders, str(base / "version_<n>" / "checkpoints")


def _newest(files: list[Path]) -> Path | None:
    return max(files, key=lambda path: (path.stat().st_mtime, str(path))) if files else None


def resolve_last(config: Any, subcommand: str) -> str:
    """``--ckpt_path last`` -> the newest ``last.ckpt`` of the run name (announced), or an error
    naming the folders searched and the file form."""
    folders, pattern = run_checkpoint_folders(config)
    last = _newest([folder / "last.ckpt" for folder in folders if (folder / "last.ckpt").is_file()])
    if last is None:
        raise CheckpointPathError(
            f"--ckpt_path last: there is no last.ckpt in {pattern} (each command logs into a new version folder, "
            "so `last` means the newest last.ckpt of the run's logger save_dir/name). Give the file to resume: "
            f"--ckpt_path {pattern}/last.ckpt, or leave --ckpt_path out to start a new run"
        )
    verb = "resuming from" if subcommand == "fit" else "using"
    rank_zero_info(f"--ckpt_path last: {verb} {last} (the newest last.ckpt in {pattern})")
    return str(last)


def best_error(config: Any) -> CheckpointPathError:
    """The error for ``--ckpt_path best``: it refers to a fit earlier in the same process; the file form."""
    folders, pattern = run_checkpoint_folders(config)
    newest = _newest([path for folder in folders if folder.is_dir() for path in folder.glob("best-*.ckpt")])
    example = f" (the newest here: --ckpt_path {newest})" if newest else ""
    return CheckpointPathError(
        "--ckpt_path best names the best checkpoint of a fit that ran earlier in this same Python process "
        "(trainer.fit, then trainer.test); each normlightning command is a new process, where no fit has run. "
        f"Give the checkpoint file: --ckpt_path {pattern}/best-<epoch>-<step>.ckpt{example}"
    )


def directory_error(path: str) -> CheckpointPathError:
    """The error for a ``--ckpt_path`` that is a directory: lists the ``.ckpt`` files under it."""
    files = sorted(str(file) for file in Path(path).rglob("*.ckpt"))
    listed = "\n  ".join(files[:LISTED_FILES]) + ("\n  ..." if len(files) > LISTED_FILES else "")
    found = f"its .ckpt files:\n  {listed}" if files else "it holds no .ckpt file"
    return CheckpointPathError(f"--ckpt_path {path!r} is a directory, not a checkpoint file; pass one file ({found})")


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_task_checkpoint(checkpoint: dict[str, Any], path: str) -> None:
    """Raise :class:`CheckpointPathError` unless ``checkpoint`` was written by a normlightning task.

    A task checkpoint holds ``state_dict`` and either a ``_class_path`` hyperparameter (written by
    the command) naming a :class:`~normlightning.tasks.BaseTask` subclass, or, without one,
    the random-number states that ``BaseTask.on_save_checkpoint`` stores. A ``_class_path`` that
    cannot be imported is left to the parser, whose error names it.
    """
    if "state_dict" not in checkpoint:
        raise CheckpointPathError(
            f"--ckpt_path {path!r} is not a Lightning checkpoint (no 'state_dict'; keys: "
            f"{sorted(map(str, checkpoint))[:8]}): "
            "a file of weights alone can start a backbone with --model.init_args.backbone_weights"
        )
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path is not None:
        written_by = _import(str(class_path))
        if written_by is None or (isinstance(written_by, type) and issubclass(written_by, BaseTask)):
            return
        who = f"was written by {class_path}, which is not a normlightning task (a subclass of {BASE_TASK})"
    elif RNG_CHECKPOINT_KEY in checkpoint:
        return
    else:
        names = [str(key) for key in hparams if not str(key).startswith("_")]
        weights = list(checkpoint["state_dict"])[:3]
        who = (
            "was written by another LightningModule (the file does not record its class; its hyperparameters: "
            f"{names}, first weights: {weights})"
        )
    raise CheckpointPathError(
        f"--ckpt_path {path!r} is not a normlightning task checkpoint: it {who}. Pass a checkpoint written by "
        "`normlightning fit` (runs/<name>/version_<n>/checkpoints/*.ckpt)"
    )


def check_num_classes(
    checkpoint_hparams: dict[str, Any], path: str, data_num_classes: Any, model_num_classes: Any
) -> None:
    """Raise :class:`CheckpointPathError` when the checkpoint's ``num_classes`` differs from the run's.

    Args:
        checkpoint_hparams: the checkpoint's ``hyper_parameters``.
        path: the checkpoint file, for the message.
        data_num_classes: the data module's ``num_classes`` (``None``: it has none).
        model_num_classes: the task's ``num_classes`` (from the data, or given with ``--model.num_classes``).
    """
    stored = checkpoint_hparams.get("num_classes")
    if stored is None or model_num_classes is None or stored == model_num_classes:
        return
    source = "the data has" if data_num_classes == model_num_classes else "the task is given"
    raise CheckpointPathError(
        f"--ckpt_path {path!r} was trained with num_classes={stored}, but {source} num_classes={model_num_classes}: "
        f"its classifier cannot be loaded. Use data with the checkpoint's {stored} classes, or train a new model "
        f"for {model_num_classes} classes (fit without --ckpt_path)"
    )
