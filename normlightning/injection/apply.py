"""Applying a spec to a model: installing layers, copying state, parameter normalizations.

:func:`inject` plans (:mod:`normlightning.injection.plan`) and applies in one call, on any
``nn.Module`` and without a Trainer; :func:`apply_spec` replays a stored spec (checkpoint
restore); :func:`restore_injection` is the ``on_load_checkpoint`` helper; :func:`mark_pretrained`
records which tensors came from pretrained weights, so that :func:`inject`'s summary says which
layers started from pretrained statistics.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlightning.injection.carry import NormWithCarried
from normlightning.injection.plan import plan_injection
from normlightning.injection.rules import InjectionRules
from normlightning.injection.spec import CHECKPOINT_KEY, build_layer, get_spec, same_layers, set_spec, validate_spec
from normlightning.norms import norm_group_args, param_norms
from normlightning.norms.model_walk import is_norm_layer

__all__ = [
    "apply_param_norm",
    "apply_spec",
    "copy_matching_state",
    "inject",
    "install_layer",
    "mark_pretrained",
    "pretrained_names",
    "restore_injection",
]

#: Module attribute: names of the module's own parameters and buffers loaded from pretrained weights.
PRETRAINED_ATTR = "_normlightning_pretrained"
_STATISTICS = frozenset({"running_mean", "running_var"})


def mark_pretrained(model: nn.Module, keys: Iterable[str]) -> None:
    """Record that the ``state_dict`` keys ``keys`` of ``model`` were loaded from pretrained weights
    (on each owning module, so the record survives wrapping ``model`` in a task)."""
    by_module: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        module_name, _, tensor_name = key.rpartition(".")
        by_module[module_name].add(tensor_name)
    for module_name, names in by_module.items():
        module = model.get_submodule(module_name)
        setattr(module, PRETRAINED_ATTR, pretrained_names(module) | frozenset(names))


def pretrained_names(module: nn.Module) -> frozenset[str]:
    """Names of ``module``'s own parameters and buffers marked by :func:`mark_pretrained`."""
    return getattr(module, PRETRAINED_ATTR, frozenset())


def _has_seen_data(layer: nn.Module) -> bool:
    """Whether ``layer`` has tracked batches (its state is not its initialisation). A layer on the
    meta device holds no values: it has seen nothing."""
    tracked = getattr(layer, "num_batches_tracked", None)
    return isinstance(tracked, torch.Tensor) and not tracked.is_meta and int(tracked) > 0


def _state_notes(copied: list[str], pretrained: frozenset[str], trained: bool) -> list[str]:
    """Summary notes: what was copied from the old layer, what of it was pretrained, and
    ``pretrained statistics`` when the running mean and variance were. Nothing when the old
    layer was fresh (neither loaded from weights nor trained): copying its initial values is no news."""
    if not copied or not (pretrained or trained):
        return []
    note = f"copied {', '.join(copied)}"
    from_weights = [name for name in copied if name in pretrained]
    if from_weights:
        note += " (pretrained)" if len(from_weights) == len(copied) else f" (pretrained: {', '.join(from_weights)})"
    return [note] + (["pretrained statistics"] if _STATISTICS <= set(from_weights) else [])


def copy_matching_state(old: nn.Module, new: nn.Module) -> list[str]:
    """Copy ``weight``/``bias`` and same-named buffers from ``old`` to ``new`` where shapes agree.

    Returns the names copied. Buffers are matched by name (``running_mean``, ``running_var``,
    ``num_batches_tracked``), so statistics with another meaning (per-group, raw moments) are not
    mixed up with BN's per-channel ones.
    """
    copied = []
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src, dst = getattr(old, pname, None), getattr(new, pname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                copied.append(pname)
        new_buffers = dict(new.named_buffers(recurse=False))
        for bname, src in old.named_buffers(recurse=False):
            dst = new_buffers.get(bname)
            if src is not None and dst is not None and src.shape == dst.shape:
                dst.copy_(src)
                copied.append(bname)
    return copied


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("cannot replace the root module itself; wrap it in a container first")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def install_layer(root: nn.Module, record: Mapping[str, Any], *, copy_state: bool = False) -> list[str]:
    """Replace the module at ``record["name"]`` by the layer the record describes.

    The new layer is moved to the old one's device (and floating dtype) and takes its training
    mode; modules the record lists under ``carried`` (taken from the old layer) run after it
    (:class:`~normlightning.injection.carry.NormWithCarried`). ``copy_state`` copies matching
    affine parameters and buffers (:func:`copy_matching_state`); returns the names copied.
    """
    name = record["name"]
    old = root.get_submodule(name)
    new = build_layer(dict(record))
    ref = next(iter(old.parameters()), None)
    ref = next(iter(old.buffers()), None) if ref is None else ref
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    copied = copy_matching_state(old, new) if copy_state else []
    if record.get("convolution"):  # cbn: the convolution whose weights compensate its statistics
        new.attach_convolution(root.get_submodule(record["convolution"]))
    carried = record.get("carried") or []
    if carried:
        available = dict(old.named_children())
        missing = [c for c in carried if c not in available]
        if missing:
            raise ValueError(
                f"layer {name!r} ({type(old).__name__}) has no module(s) {missing} to carry over; the model "
                "differs from the one the injection spec was made for"
            )
        new = NormWithCarried(new, {c: available[c] for c in carried})
    new.train(old.training)
    _replace_submodule(root, name, new)
    if record.get("activation"):  # norm.remove_following_activation: the layer's own activation replaces it
        _replace_submodule(root, record["activation"], nn.Identity())
    return copied


def apply_param_norm(module: nn.Module, kind: str) -> None:
    """Weight standardization, weight normalization or weight centering on ``module``'s weight, in place."""
    if kind == "weight_standardization":
        param_norms.apply_weight_standardization(module)
    elif kind == "weight_norm":
        param_norms.apply_weight_norm(module)
    elif kind == "weight_centering":
        param_norms.apply_weight_centering(module)
    else:
        raise ValueError(
            f"unknown parameter normalization {kind!r}; valid: weight_standardization, weight_norm, weight_centering"
        )


def _check_eager(model: nn.Module) -> None:
    """``TypeError`` when ``model`` is, or holds, a TorchScript module (``torch.jit.script`` /
    ``torch.jit.trace``): its layers cannot be replaced, and its code would not call new ones."""
    scripted: list[str] = []  # outermost TorchScript modules only
    for name, module in model.named_modules():
        inside = any(not outer or name.startswith(outer + ".") for outer in scripted)
        if isinstance(module, torch.jit.ScriptModule) and not inside:
            scripted.append(name)
    scripted = [name or "the model itself" for name in scripted]
    if scripted:
        raise TypeError(
            f"inject: {', '.join(scripted[:3])} {'is a' if len(scripted) == 1 else 'are'} TorchScript module(s) "
            "(torch.jit.script / torch.jit.trace), whose layers cannot be replaced; inject into the eager "
            "nn.Module first, then script or trace the result"
        )


def _conflicts(model: nn.Module, spec: Mapping[str, Any], rules: InjectionRules) -> list[str]:
    """Where ``rules`` ask for other layers than the ``spec`` already applied to ``model`` (a method,
    or a requested argument the installed layer does not have), one line per layer, or other
    parameter normalizations. Counts given as ``auto``, and any count under ``group_fit: nearest``,
    are fitted per layer, so only the method is compared for them."""
    from normlightning.injection.plan import layer_args

    out = []
    for rec in spec["layers"]:
        rule = rules.rule_for(rec["name"])
        if rule.method != rec["method"]:
            out.append(f"{rec['name']}: has {rec['method']}, asked {rule.method or 'to keep the original layer'}")
            continue
        fitted = {arg.name for arg in norm_group_args(rec["method"]) if arg.divides != "batch"}
        have = layer_args(model, rec)
        for key, value in rule.kwargs.items():
            if (isinstance(value, str) and value.startswith("auto")) or (
                key in fitted and rules.group_fit == "nearest"
            ):
                continue
            if key in have and have[key] != value:
                out.append(f"{rec['name']}: has {rec['method']} with {key}={have[key]!r}, asked {key}={value!r}")
    applied = sorted({rec["kind"] for rec in spec["param_norms"]})
    wanted = any(rules.wants_param_norm(name, module) for name, module in model.named_modules() if name)
    if applied != ([rules.param_norm] if wanted else []):
        out.append(f"parameter normalization: has {applied or 'none'}, asked {rules.param_norm or 'none'}")
    return out


def _nothing_replaced(model: nn.Module, rules: InjectionRules, kept: list[dict[str, str]]) -> str:
    """The warning for an injection that replaced nothing, naming the fix."""
    what = f"inject: nothing in {type(model).__name__} was replaced"
    if kept:
        return f"{what}: all {len(kept)} of its target layers were kept (excluded, or subclasses: see the summary)"
    own = list(dict.fromkeys(type(m).__name__ for m in model.modules() if is_norm_layer(m)))
    fix = (
        f"its normalization layers are {', '.join(own)}: name them in targets (norm.targets: {own})"
        if own
        else "name its normalization layer classes in targets (norm.targets), a torch.nn name or 'package.module.Class'"
    )
    return f"{what}: it has no layer of the target types ({', '.join(rules.targets)}); {fix}"


def inject(
    model: nn.Module,
    rules: InjectionRules | None = None,
    *,
    example_input: Any = None,
    batch_size: int | None = None,
    **settings: Any,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Rewrite ``model``'s normalization layers in place; any ``nn.Module``, no Trainer needed.

    Args:
        model: the model to change.
        rules: the settings, or give them as keywords (``method="gn", num_groups=32``,
            ``virtual_devices=4``, ...: the arguments of :class:`~normlightning.injection.rules.InjectionRules`).
        example_input: one input for an eval forward (to probe layer sizes; needed by ``bgn``).
        batch_size: per-process batch; ``auto`` group counts use the per-device batch
            ``batch_size / virtual_devices``.

    Returns:
        ``(spec, rows)``: the applied spec (also kept on the model, see
        :func:`~normlightning.injection.spec.get_spec`) and the summary rows (each replaced layer
        notes which parameters and statistics it started from, and ``pretrained statistics`` when
        its running statistics came from pretrained weights, see :func:`mark_pretrained`).

    A model that already carries a spec is left as it is when the settings ask for the same layers
    (its spec is returned); settings that ask for others (another method, another argument) raise
    ``ValueError``: inject once, into the model with its original layers. TorchScript modules raise
    ``TypeError`` (inject before ``torch.jit.script`` / ``trace``). A model on the meta device gets
    new layers on the meta device (materialize with ``to_empty`` and ``reset_parameters`` or a
    ``state_dict``). A model in which nothing is replaced gets a warning naming ``targets``.
    """
    from normlightning.injection.plan import summary_rows

    if rules is None:
        rules = InjectionRules(**settings)
    elif settings:
        raise TypeError("inject: give either `rules` or keyword settings, not both")
    _check_eager(model)
    if rules.is_target(model):
        raise ValueError(
            f"inject: the model is itself a {type(model).__name__}, one of the target layers, and the injection "
            "replaces layers inside a model: wrap the layer in a container first, e.g. nn.Sequential(layer)"
        )
    existing = get_spec(model)
    if existing is not None:
        conflicts = _conflicts(model, existing, rules)
        if conflicts:
            raise ValueError(
                "inject: the model already carries injected layers, and these settings ask for others ("
                + "; ".join(conflicts[:3])
                + ("; ..." if len(conflicts) > 3 else "")
                + "). Inject once, into the model with its original layers: build the model again (and load its "
                "weights) before injecting other settings"
            )
        return existing, summary_rows(model, existing)
    spec, kept = plan_injection(model, rules, example_input=example_input, batch_size=batch_size)
    if not spec["layers"] and not spec["param_norms"] and not rules.changes_nothing:
        warnings.warn(_nothing_replaced(model, rules, kept), stacklevel=2)
    for rec in spec["layers"]:
        old = model.get_submodule(rec["name"])
        pretrained, trained = pretrained_names(old), _has_seen_data(old)
        copied = install_layer(model, rec, copy_state=rules.copy_state)
        rec["notes"] = rec["notes"] + _state_notes(copied, pretrained, trained)
    for rec in spec["param_norms"]:
        apply_param_norm(model.get_submodule(rec["name"]), rec["kind"])
    set_spec(model, spec)
    return spec, summary_rows(model, spec, kept)


def _param_norms_of(spec: Mapping[str, Any] | None) -> dict[str, str]:
    return {rec["name"]: rec["kind"] for rec in (spec or {}).get("param_norms", [])}


def apply_spec(model: nn.Module, spec: dict[str, Any]) -> int:
    """Rebuild the layers and parameter normalizations that ``spec`` lists; return how many changed.

    Idempotent: when ``model`` already carries the same layers nothing is rebuilt. New layers are
    freshly initialised (their weights and statistics come from the ``state_dict`` loaded next).
    """
    spec = validate_spec(spec)
    current = get_spec(model)
    if same_layers(current, spec):
        set_spec(model, spec)
        return 0
    if current is not None:
        warnings.warn(
            "the model already carries a different norm injection spec (e.g. the `norm:` config changed since "
            "the checkpoint was written); rebuilding the layers the checkpoint lists",
            stacklevel=2,
        )
    for rec in spec["layers"]:
        install_layer(model, rec)  # a NormWithCarried in place still holds the modules to carry
    wanted, have = _param_norms_of(spec), _param_norms_of(current)
    extra = sorted(set(have) - set(wanted))
    if extra or any(have.get(n, k) != k for n, k in wanted.items()):
        raise ValueError(
            "the model's weight standardization / weight norm differs from the checkpoint's on "
            f"{extra or sorted(wanted)}; build the model with the same `norm.weight_standardization` / "
            "`norm.weight_norm` settings as the checkpoint"
        )
    for name, kind in wanted.items():
        module = model.get_submodule(name)
        if not parametrize.is_parametrized(module, "weight"):
            apply_param_norm(module, kind)
    set_spec(model, spec)
    return len(spec["layers"]) + len(set(wanted) - set(have))


def restore_injection(model: nn.Module, checkpoint: Mapping[str, Any]) -> int:
    """``on_load_checkpoint`` helper: re-apply the spec stored in ``checkpoint`` (if any) to ``model``.

    Lightning runs ``on_load_checkpoint`` before ``load_state_dict``, both in
    ``load_from_checkpoint`` and when ``Trainer.fit(ckpt_path=...)`` resumes. Returns the number of
    modules rebuilt (0 when there is no spec or it already holds).
    """
    spec = checkpoint.get(CHECKPOINT_KEY)
    return 0 if spec is None else apply_spec(model, spec)
