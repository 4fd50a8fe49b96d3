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
from typing import Any

from torch import nn

from normlightning.norms import build_norm

__all__ = [
    "CHECKPOINT_KEY",
    "MODULE_ATTR",
    "SPEC_VERSION",
    "build_layer",
    "get_spec",
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
