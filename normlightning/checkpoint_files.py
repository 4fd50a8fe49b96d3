"""Checkpoint files: a clear error for a missing, empty, truncated or unsafe file, and a weights-only read.

Used wherever normlightning opens a checkpoint a user names: the CLI's ``--ckpt_path`` check, the
``norm:`` injection's checkpoint spec and :meth:`~normlightning.tasks.BaseTask.load_from_checkpoint`.
What a weights-only load refuses, and how to convert a trusted file, is :mod:`normlightning.safe_loading`.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from normlightning.safe_loading import refuse_unsafe_checkpoint, unsafe_checkpoint_error

__all__ = ["check_checkpoint_file", "read_checkpoint"]


def check_checkpoint_file(path: str | os.PathLike, *, what: str = "checkpoint", weights_only: bool = True) -> str:
    """Raise a clear error for a missing, empty or truncated checkpoint file (``torch.load`` would
    give a bare ``EOFError`` naming neither the file nor the cause), or, with ``weights_only``, one
    that names types a ``torch.load(weights_only=True)`` refuses (loading them could run code from
    the file: :func:`~normlightning.safe_loading.refuse_unsafe_checkpoint`); return the path as a string.

    A truncated file is recognised without reading it: ``torch.save`` writes a zip archive, whose
    directory sits at the end of the file. The types are listed from the archive's pickle without
    calling any of them.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes): it was not written completely; use another checkpoint")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{what} {path!r} ({size} bytes) is truncated or not a checkpoint written by torch.save / Lightning "
            "(no zip archive directory at its end); use another checkpoint"
        )
    if weights_only:
        refuse_unsafe_checkpoint(path, what=what)
    return path


def read_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a checkpoint on the CPU after :func:`check_checkpoint_file`.

    Raises:
        UnsafeFileError: the file needs a type that a weights-only load refuses (it names the file,
            the types and how to convert a trusted file); nothing in the file was run.
        ValueError: the file is missing, empty, truncated or not a PyTorch checkpoint.
    """
    path = check_checkpoint_file(path, what=what)
    size = os.path.getsize(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # refused by torch's weights-only unpickler, not seen by the up-front scan
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = " ".join(lines[1:-1]) or str(err)  # torch's message without its general first and last lines
        raise unsafe_checkpoint_error(path, what=what, needs=f"more than a weights-only load allows: {reason}") from err
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise ValueError(
            f"{what} {path!r} ({size} bytes) cannot be read, it is truncated or not a PyTorch checkpoint: "
            f"{type(err).__name__}: {err}"
        ) from err
