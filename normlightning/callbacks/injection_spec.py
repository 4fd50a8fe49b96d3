"""The applied injection spec: a plain, checkpoint-safe record of which layers were rewritten.

:class:`~normlightning.callbacks.norm_injection.NormInjection` decides *what* to put where
(rules, ``auto`` group counts, fitting); this module only *replays* a decision.  The spec is
a JSON-like ``dict`` (str / int / float / bool / None / list / dict only, so it survives
``torch.load(weights_only=True)``)::

    {
      "version": 1,
      "layers": [                       # one record per replaced module, in model order
        {"name": "backbone.layer1.0.bn1", "old_type": "BatchNorm2d",
         "method": "bgn", "kwargs": {"num_features": 64, "num_groups": 16, "eps": 1e-05, ...}},
        ...
      ],
      "param_norms": [                  # WS / WN applied to conv (or linear) weights
        {"name": "backbone.conv1", "kind": "weight_standardization"},
        ...
      ],
    }

It is stored in the checkpoint under :data:`CHECKPOINT_KEY` and on the model as the attribute
:data:`MODULE_ATTR`, so that ``Task.load_from_checkpoint(path)`` (whose ``on_load_checkpoint``
calls :func:`restore_injection`) rebuilds the same layers *before* ``load_state_dict`` and the
stored weights and statistics fit.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

CHECKPOINT_KEY = "norm_injection"
MODULE_ATTR = "_norm_injection_spec"
SPEC_VERSION = 1
PARAM_NORM_KINDS = ("weight_standardization", "weight_norm")


def empty_spec() -> dict[str, Any]:
    """A spec that changes nothing."""
    return {"version": SPEC_VERSION, "layers": [], "param_norms": []}


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` inside ``root``; return the module it replaced."""
    if not name:
        raise ValueError("cannot replace the root module itself; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def install_layer(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the module at ``name`` by ``new``, moved to the old module's device (and
    floating dtype) and given its training mode; return the module it replaced."""
    old = root.get_submodule(name)
    ref = next(iter(old.parameters()), None)
    ref = next(iter(old.buffers()), None) if ref is None else ref
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    new.train(old.training)
    return replace_submodule(root, name, new)


def build_layer(record: dict[str, Any]) -> nn.Module:
    """Build the norm layer described by one ``layers`` record with ``build_norm``."""
    from normlightning.norms import build_norm

    kwargs = dict(record["kwargs"])
    num_features = kwargs.pop("num_features")
    return build_norm(record["method"], num_features, **kwargs)


def apply_param_norm(module: nn.Module, kind: str) -> None:
    """Apply weight standardization or weight normalization to ``module``'s weight in place."""
    from normlightning.norms import param_norms

    if kind == "weight_standardization":
        param_norms.apply_weight_standardization(module)
    elif kind == "weight_norm":
        param_norms.apply_weight_norm(module)
    else:
        raise ValueError(f"unknown parameter normalization {kind!r}; valid: {', '.join(PARAM_NORM_KINDS)}")


def has_param_norm(module: nn.Module) -> bool:
    """Whether ``module.weight`` already carries a parametrization (WS / WN)."""
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module, "weight")


def get_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec applied to ``model`` so far (``None`` when nothing was injected)."""
    return getattr(model, MODULE_ATTR, None)


def set_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """Record ``spec`` as applied to ``model`` (a deep copy, kept as a plain attribute)."""
    # object.__setattr__: a plain attribute, not registered as a parameter / buffer / module
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


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> int:
    """Rebuild the layers and parameter normalizations that ``spec`` lists; return how many changed.

    Idempotent: when ``model`` already carries exactly ``spec`` nothing happens.  New layers are
    freshly initialised (their weights and statistics come from the ``state_dict`` loaded next)
    and moved to the device/dtype of the module they replace.
    """
    spec = validate_spec(spec)
    current = get_spec(model)
    if current == spec:
        return 0
    if current is not None:
        warnings.warn(
            "the model already carries a different norm injection spec (e.g. the `norm:` config changed since "
            "the checkpoint was written); rebuilding the layers the checkpoint lists",
            stacklevel=2,
        )
    changed = 0
    for rec in spec["layers"]:
        install_layer(model, rec["name"], build_layer(rec))
        changed += 1
    wanted = {rec["name"]: rec["kind"] for rec in spec["param_norms"]}
    have = {rec["name"]: rec["kind"] for rec in (current or {}).get("param_norms", [])}
    extra = sorted(set(have) - set(wanted))
    if extra or any(have.get(n, k) != k for n, k in wanted.items()):
        raise ValueError(
            "the model's weight standardization / weight norm differs from the checkpoint's on "
            f"{extra or sorted(wanted)}; build the model with the same `norm.weight_standardization` / "
            "`norm.weight_norm` settings as the checkpoint"
        )
    for name, kind in wanted.items():
        module = model.get_submodule(name)
        if not has_param_norm(module):
            apply_param_norm(module, kind)
            changed += 1
    set_spec(model, spec)
    return changed


def restore_injection(model: nn.Module, checkpoint: dict[str, Any]) -> int:
    """``on_load_checkpoint`` helper: re-apply the spec stored in ``checkpoint`` (if any) to ``model``.

    Call it from a LightningModule's ``on_load_checkpoint`` (``BaseTask`` does), which Lightning runs
    before ``load_state_dict`` both in ``load_from_checkpoint`` and when ``Trainer.fit(ckpt_path=...)``
    resumes.  Returns the number of modules rebuilt (0 when there is no spec or it already holds).
    """
    spec = checkpoint.get(CHECKPOINT_KEY)
    if spec is None:
        return 0
    return apply_spec(model, spec)


def store_injection(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` helper: write ``model``'s applied spec (if any) into ``checkpoint``."""
    spec = get_spec(model)
    if spec is not None:
        checkpoint[CHECKPOINT_KEY] = copy.deepcopy(spec)
