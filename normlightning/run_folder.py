"""A run never writes into another run's folder: the check behind the CLI's ``overwrite_run`` setting.

Every run logs into ``<save_dir>/<name>/<version>/`` (its config, hyperparameters, events,
checkpoints, predictions). Without a ``version`` the logger takes the next free ``version_<n>``;
with a fixed one (``--trainer.logger.init_args.version=0``) a second run would overwrite the
first one's ``config.yaml`` and ``hparams.yaml`` and put its checkpoints next to the first run's.
:func:`check_run_folder` refuses a folder that already holds files unless

- the command is ``fit`` and resumes from that run (``--ckpt_path`` is a file inside the folder,
  or ``last``/``hpc``, which Lightning looks up in this run's folders), or
- ``overwrite_run: true`` asks for it.
"""

from __future__ import annotations

import os

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

__all__ = ["RunFolderNotEmptyError", "check_run_folder"]


class RunFolderNotEmptyError(FileExistsError):
    """The run's log folder already holds another run's files."""


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_run_folder(trainer: Trainer, subcommand: str, ckpt_path: str | None, overwrite: bool) -> None:
    """Raise :class:`RunFolderNotEmptyError` when this run would write into a folder that holds
    files of an earlier run (see the module docstring); only for the TensorBoard and CSV loggers,
    whose folder is ``<save_dir>/<name>/<version>``."""
    if overwrite or not isinstance(trainer.logger, (TensorBoardLogger, CSVLogger)):
        return
    folder = trainer.log_dir
    if folder is None or not os.path.isdir(folder) or not os.listdir(folder):
        return
    if subcommand == "fit" and ckpt_path is not None:
        if str(ckpt_path) in ("last", "hpc") or _inside(str(ckpt_path), folder):
            return
    version = trainer.logger.version
    raise RunFolderNotEmptyError(
        f"the run folder {folder} already holds files of another run ({', '.join(sorted(os.listdir(folder))[:5])}), "
        f"and this {subcommand} would overwrite them. Leave out --trainer.logger.init_args.version (now {version!r}) "
        f"to get a new version_<n> folder, or give an unused one; to continue that run, resume it: fit "
        f"--ckpt_path {os.path.join(folder, 'checkpoints', 'last.ckpt')}; or set overwrite_run=true to write into "
        f"it anyway."
    )
