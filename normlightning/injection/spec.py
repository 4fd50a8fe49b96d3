"""The applied injection spec: a plain, checkpoint-safe record of which layers were rewritten.

A spec is a JSON-like ``dict`` (str / int / float / bool / None / list / dict only, so it
survives ``torch.load(weights_only=True)``)::

    {
      "version": 1,
      "layers": [                       # one record per replaced module, in model order
        {"name": "backbone.layer1.0.bn1", "old_type": "BatchNorm2d", "method": "bgn",
         "kwargs": {"num_features": 64, "num_groups": 16, "eps": 1e-05, ...},  # "virtual_devices": k when k > 1
         "carried": ["drop", "act"],    # modules of the old layer that run after the new one
         "notes": ["num_groups auto->16 (B=8)"]},
        ...
      ],
      "param_norms": [{"name": "backbone.conv1", "kind": "weight_standardization"}, ...],
    }

It lives on the model as the attribute :data:`MODULE_ATTR` and in checkpoints under
:data:`CHECKPOINT_KEY`; a task's ``on_load_checkpoint`` calls :func:`restore_injection`, which
rebuilds the same layers before ``load_state_dict``.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from typing import Any

import torch
from torch import nn

from normlightning.norms import build_norm
from normlightning.safe_loading import refuse_unsafe_checkpoint, unsafe_checkpoint_error

__all__ = [
    "CHECKPOINT_KEY",
    "MODULE_ATTR",
    "SPEC_VERSION",
    "build_layer",
    "check_checkpoint_file",
    "get_spec",
    "read_checkpoint",
    "same_layers",
    "set_spec",
    "store_injection",
    "validate_spec",
]

CHECKPOINT_KEY = "norm_injection"
MODULE_ATTR = "_norm_injection_spec"
SPEC_VERSION = 1


def build_layer(record: dict[str, Any]) -> nn.Module:
    """The norm layer of one ``layers`` record, built with ``build_norm`` (no carried modules)."""
    kwargs = dict(record["kwargs"])
    num_features = kwargs.pop("num_features")
    return build_norm(record["method"], num_features, **kwargs)


def get_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec applied to ``model`` so far (``None`` when nothing was injected)."""
    return getattr(model, MODULE_ATTR, None)


def set_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Record ``spec`` as applied to ``model`` (a deep copy, a plain attribute: not a parameter,
    buffer or submodule)."""
    object.__setattr__(model, MODULE_ATTR, copy.deepcopy(spec))


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check the structure of a spec read from a checkpoint; raise ``ValueError`` when it is not one."""
    if not isinstance(spec, dict) or "layers" not in spec or "param_norms" not in spec:
        raise ValueError(
            f"checkpoint[{CHECKPOINT_KEY!r}] is not a norm injection spec (expected a dict with 'layers' and "
            f"'param_norms'), got {type(spec).__name__}"
        )
    if spec.get("version", SPEC_VERSION) > SPEC_VERSION:
        raise ValueError(
            f"norm injection spec version {spec['version']} is newer than this normlightning understands "
            f"({SPEC_VERSION}); upgrade normlightning"
        )
    for rec in spec["layers"]:
        if not {"name", "method", "kwargs"} <= set(rec) or "num_features" not in rec["kwargs"]:
            raise ValueError(f"malformed layer record in norm injection spec: {rec!r}")
    return spec


def store_injection(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` helper: write ``model``'s applied spec (if any) into ``checkpoint``.

    The one place a spec is written into a checkpoint: :class:`~normlightning.tasks.BaseTask`
    calls it; a LightningModule of your own calls it from its ``on_save_checkpoint``.
    """
    spec = get_spec(model)
    if spec is not None:
        checkpoint[CHECKPOINT_KEY] = copy.deepcopy(spec)


def same_layers(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two specs install the same layers and parameter normalizations (notes aside)."""

    def decisions(spec: dict[str, Any] | None) -> tuple[list, list]:
        spec = spec or {"layers": [], "param_norms": []}
        layers = [(r["name"], r["method"], r["kwargs"], r.get("carried", [])) for r in spec["layers"]]
        return layers, [(r["name"], r["kind"]) for r in spec["param_norms"]]

    return decisions(a) == decisions(b)


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
