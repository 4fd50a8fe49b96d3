"""Reading files made by others without running code from them.

A pickle names the functions and classes it calls while it loads (its ``GLOBAL`` opcodes): a file
built to call ``os.system`` runs a command when plain ``pickle.load`` or
``torch.load(weights_only=False)`` reads it. Every file normlightning reads from a user's disk is
loaded by a reader that calls only an allow-list and refuses a file naming anything else, with an
:class:`UnsafeFileError` that names the file, the types it needs and how to convert a trusted file:

- checkpoints (``.ckpt``): ``torch.load(weights_only=True)`` (tensors, containers, numbers,
  strings and the types torch allows; more only through the user's own
  ``torch.serialization.add_safe_globals``), checked up front by :func:`refuse_unsafe_checkpoint`;
- dataset pickles (miniImageNet, CIFAR): :func:`load_data_pickle`, whose unpickler builds only
  dicts, lists, tuples, numbers, strings and numpy arrays, dtypes and scalars
  (:data:`DATA_PICKLE_GLOBALS`).

Configs are different: they are code by design (``class_path`` builds any class).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch

__all__ = [
    "DATA_PICKLE_GLOBALS",
    "UnsafeFileError",
    "load_data_pickle",
    "refuse_unsafe_checkpoint",
    "unsafe_checkpoint_error",
]

#: ``(module, name)`` of every global a dataset pickle may name: what numpy arrays, dtypes and
#: scalars pickle to (numpy 1 and 2 module names, protocols 0-5), and ``_codecs.encode``, with
#: which Python 3 pickles ``bytes`` at protocol <= 2. Dicts, lists, tuples, numbers and strings
#: need no global.
DATA_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
)

DATA_PICKLE_CONVERSION = (
    "If you trust the file, convert it once to plain types: load it with pickle.load(open(path, 'rb'), "
    "encoding='latin1') (this runs the file's code), keep only numpy arrays, dicts, lists, numbers and strings "
    "(e.g. {'data': uint8 array, 'labels': list of int}) and pickle.dump them into a new file"
)

CHECKPOINT_CONVERSION = (
    "If you trust the file: register a harmless type of your own with "
    "torch.serialization.add_safe_globals([TheType]) before loading (your promise that loading it runs no code), or "
    "convert the file once: ckpt = torch.load(path, weights_only=False) (this runs the file's code), replace those "
    "objects by plain values (dicts, lists, numbers, strings, tensors) and torch.save(ckpt, new_path)"
)


class UnsafeFileError(ValueError):
    """A file needs a type whose loading could run code from the file; it was not loaded."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`DATA_PICKLE_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in DATA_PICKLE_GLOBALS:
            raise UnsafeFileError(f"{module}.{name}")
        return super().find_class(module, name)


def load_data_pickle(path: str | os.PathLike, *, what: str = "dataset file") -> Any:
    """The object pickled in ``path`` (Python 2 strings read as latin-1), built without running code.

    Raises:
        UnsafeFileError: the file names a global outside :data:`DATA_PICKLE_GLOBALS`; nothing it
            names was called.
        OSError, pickle.UnpicklingError, EOFError, ValueError: the file cannot be read or is not a pickle.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        try:
            return _DataUnpickler(file, encoding="latin1").load()
        except UnsafeFileError as refused:
            raise UnsafeFileError(
                f"{what} {path!r} needs the type {refused} to load, which a dataset file may not hold: loading it "
                f"could run code from the file (dataset pickles may hold only numpy arrays, dtypes and scalars, "
                f"dicts, lists, numbers and strings). {DATA_PICKLE_CONVERSION}"
            ) from None


def unsafe_checkpoint_error(path: str, *, what: str, needs: str) -> UnsafeFileError:
    """The error for a checkpoint that needs ``needs`` (e.g. ``"the types posix.system"``) to load."""
    return UnsafeFileError(
        f"{what} {path!r} needs {needs} to load, which a checkpoint may not hold: loading it could run code from "
        f"the file (normlightning reads checkpoints with torch.load(weights_only=True)). {CHECKPOINT_CONVERSION}"
    )


def refuse_unsafe_checkpoint(path: str, *, what: str = "checkpoint") -> None:
    """Raise :class:`UnsafeFileError` when the checkpoint ``path`` (a ``torch.save`` zip archive)
    names types that ``torch.load(weights_only=True)`` refuses (neither torch's defaults nor the
    user's ``add_safe_globals``); the types are listed from the pickle's opcodes, none is called."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file this scan cannot parse is left to torch.load's own error
        return
    if unsafe:
        raise unsafe_checkpoint_error(path, what=what, needs=f"the types {', '.join(unsafe)}")
