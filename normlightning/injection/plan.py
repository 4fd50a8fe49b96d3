"""Planning an injection: which layer becomes what, decided without changing the model.

:func:`plan_injection` probes the target layers' input shapes (one no-grad eval forward, only
when a group count must divide ``D = C*S``), applies the rules and the group-count resolution to
every target layer and returns the spec (:mod:`normlightning.injection.spec`) plus the rows of
layers it keeps. :func:`summary_rows` / :func:`format_summary` turn a spec into the table printed
at setup.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlightning.injection.carry import NormWithCarried, carried_modules
from normlightning.injection.groups import per_device_batch_size, resolve_groups
from normlightning.injection.rules import InjectionRules, LayerRule
from normlightning.injection.spec import SPEC_VERSION, build_layer
from normlightning.norms import norm_group_args
from normlightning.norms.registry import norm_accepts, norm_class_name, norm_factory

__all__ = ["format_summary", "layer_args", "plan_injection", "probe_input_shapes", "summary_rows"]

TORCH_DEFAULT_MOMENTUM = 0.1


def probe_input_shapes(model: nn.Module, example_input: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Input shape of each named submodule in one no-grad, eval-mode forward of ``example_input``.

    ``example_input`` is a tensor, a tuple of positional arguments or a dict of keyword arguments
    (as ``LightningModule.example_input_array``). The model's train/eval modes are restored.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def hook(_module: nn.Module, args: tuple, _name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(_name, tuple(args[0].shape))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")

    def to_device(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**{k: to_device(v) for k, v in example_input.items()})
            elif isinstance(example_input, tuple):
                model(*(to_device(v) for v in example_input))
            else:
                model(to_device(example_input))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def _num_features(layer: nn.Module, name: str) -> int:
    """Channel count of a native norm layer (BatchNorm / InstanceNorm / GroupNorm / 1-D LayerNorm)."""
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    if isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1:
            raise ValueError(
                f"layer {name!r}: LayerNorm over {tuple(layer.normalized_shape)} cannot be replaced (only a "
                f"LayerNorm over the last axis of (N, C) inputs can); exclude it with norm.exclude"
            )
        return int(layer.normalized_shape[0])
    if hasattr(layer, "num_features"):
        return int(layer.num_features)
    raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no channel count; exclude it with norm.exclude")


def _old_affine(layer: nn.Module) -> bool:
    return bool(getattr(layer, "affine", getattr(layer, "elementwise_affine", True)))


def _build_checked(record: dict[str, Any]) -> nn.Module:
    """Build one layer now (validates its kwargs), naming the layer when ``build_norm`` refuses."""
    try:
        return build_layer(record)
    except (ValueError, TypeError) as err:
        raise type(err)(f"norm: cannot build {record['method']!r} for layer {record['name']!r}: {err}") from err


def _uses_batch_statistics(layer: nn.Module) -> bool:
    return bool(getattr(layer, "uses_batch_statistics", False))


def _batch_statistics_at_inference(old: nn.Module) -> bool:
    """Whether ``old`` is a torch BatchNorm that normalizes with each batch's statistics in eval mode
    too: it keeps no running buffers (``track_running_stats=False``; torch's own test is
    ``running_mean is None and running_var is None``)."""
    return isinstance(old, _BatchNorm) and old.running_mean is None and old.running_var is None


def _keep_untracked(record: dict[str, Any], probe: nn.Module) -> None:
    """Carry ``track_running_stats=False`` into ``record`` for a method with running statistics, or
    raise ``ValueError`` naming the layer and the option when the method cannot keep its meaning.

    A method without running statistics (``probe`` has sets without the batch axis only: gn, ln, in,
    pn, hn with per-example sets) computes its statistics from the input at inference already.
    """
    if not _uses_batch_statistics(probe):
        return
    method, name = record["method"], record["name"]
    if norm_accepts(method, "track_running_stats"):
        record["kwargs"]["track_running_stats"] = False
        if getattr(_build_checked(record), "track_running_stats", True) is False:
            return
        del record["kwargs"]["track_running_stats"]
    raise ValueError(
        f"norm: layer {name!r} ({record['old_type']}) has track_running_stats=False (it normalizes with each "
        f"batch's statistics at inference too), but {norm_class_name(method)} ({method!r}) always normalizes with "
        "running statistics at inference. Use method bn (which keeps track_running_stats=False), a method without "
        "running statistics (gn, ln, in, pn), or keep the layer with norm.exclude"
    )


def _add_virtual_devices(
    record: dict[str, Any], probe: nn.Module, virtual_devices: int, batch_size: int | None
) -> None:
    """Put ``virtual_devices`` into ``record`` for a layer with batch statistics (a per-example layer
    has none to split: nothing to do); ``ValueError`` naming the layer when its method cannot take it,
    or naming the settings when the known per-process ``batch_size`` does not split."""
    if virtual_devices == 1 or not _uses_batch_statistics(probe):
        return
    per_device_batch_size(batch_size, virtual_devices)  # refused now rather than at the first training step
    method = record["method"]
    if not norm_accepts(method, "virtual_devices"):
        raise ValueError(
            f"norm: layer {record['name']!r}: {norm_class_name(method)} ({method!r}) has batch statistics but takes "
            f"no virtual_devices argument, so norm.virtual_devices={virtual_devices} cannot apply to it; derive it "
            "from normlightning.norms.BatchStatNorm, exclude the layer (norm.exclude) or set norm.virtual_devices: 1"
        )
    record["kwargs"]["virtual_devices"] = virtual_devices
    _build_checked(record)


def _layer_record(
    rule: LayerRule,
    group_fit: str,
    name: str,
    old: nn.Module,
    input_shape: tuple[int, ...] | None,
    batch_size: int | None,
    virtual_devices: int = 1,
) -> dict[str, Any]:
    num_features = _num_features(old, name)
    kwargs: dict[str, Any] = {"eps": float(getattr(old, "eps", 1e-5)), "affine": _old_affine(old)}
    kwargs.update(copy.deepcopy(rule.kwargs))
    asks_auto = any(isinstance(value, str) and value.startswith("auto") for value in kwargs.values())
    auto_batch = per_device_batch_size(batch_size, virtual_devices) if asks_auto else batch_size
    notes = resolve_groups(name, rule.method, kwargs, num_features, input_shape, auto_batch, group_fit)
    if rule.reason != "global":
        notes.insert(0, rule.reason)
    record = {
        "name": name,
        "old_type": type(old).__name__,
        "method": rule.method,
        "kwargs": {"num_features": num_features, **kwargs},
    }
    probe = _build_checked(record)
    if _batch_statistics_at_inference(old) and "track_running_stats" not in kwargs:
        _keep_untracked(record, probe)
    momentum = getattr(old, "momentum", TORCH_DEFAULT_MOMENTUM)
    if _uses_batch_statistics(probe) and "momentum" not in kwargs and momentum != TORCH_DEFAULT_MOMENTUM:
        record["kwargs"]["momentum"] = momentum  # the model chose it; keep it
        _build_checked(record)
    _add_virtual_devices(record, probe, virtual_devices, batch_size)
    carried = list(carried_modules(old, name, num_features, input_shape))
    if carried:
        record["carried"] = carried
    note = getattr(probe, "injection_note", None)  # what the summary must say about the layer (frn's TLU)
    record["notes"] = notes + ([note] if note else [])
    return record


def _needs_convolution(method: str) -> bool:
    """Whether the method's layer needs the convolution before it (``cbn``'s compensation)."""
    return bool(getattr(norm_factory(method), "needs_preceding_convolution", False))


def _find_convolutions(model: nn.Module, records: list[dict[str, Any]], example_input: Any) -> None:
    """Record under ``"convolution"`` the convolution whose output each layer of ``records`` reads
    (one traced forward of ``example_input``, the pairing rules of ``fold_norms``); ``ValueError``
    naming every layer without one, and why."""
    if not records:
        return
    names = [rec["name"] for rec in records]
    if example_input is None:
        raise ValueError(
            f"norm: {records[0]['method']!r} needs the convolution before each layer, found from an example forward; "
            f"give an example input (the task's example_input_array, or inject(..., example_input=...)) for {names}"
        )
    from normlightning.injection.fold import _trace

    found, problems = _trace(model, example_input, {name: model.get_submodule(name) for name in names})
    if problems:
        raise ValueError(
            f"norm: {records[0]['method']!r} needs the convolution whose output each layer normalizes; these layers "
            "have none: "
            + "; ".join(f"{name!r}: {why}" for name, why in problems.items())
            + ". Exclude them (norm.exclude) or give them another method (norm.overrides)"
        )
    for rec in records:
        rec["convolution"] = found[rec["name"]]
        rec["notes"].append(f"convolution {found[rec['name']]}")


def _find_activations(model: nn.Module, layers: list[dict[str, Any]], example_input: Any) -> None:
    """``norm.remove_following_activation``: record under ``"activation"`` the activation module after
    each layer that applies an activation of its own (``frn`` with its TLU), to be replaced by
    ``nn.Identity``; ``ValueError`` naming the layers where it is not unambiguous."""
    records = [rec for rec in layers if getattr(_build_checked(rec), "replaces_following_activation", False)]
    if not records:
        warnings.warn(
            "norm.remove_following_activation: no replaced layer applies an activation of its own (frn with "
            "tlu=True does); every activation is kept",
            stacklevel=3,
        )
        return
    names = [rec["name"] for rec in records]
    if example_input is None:
        raise ValueError(
            "norm.remove_following_activation finds the activation after each layer in an example forward; give an "
            f"example input (the task's example_input_array, or inject(..., example_input=...)) for {names}"
        )
    from normlightning.injection.activations import find_following_activations

    found, problems = find_following_activations(model, example_input, names)
    if problems:
        raise ValueError(
            "norm.remove_following_activation: these layers have no activation module that can be removed: "
            + "; ".join(f"{name!r}: {why}" for name, why in problems.items())
            + ". Exclude them (norm.exclude) or keep the activations (norm.remove_following_activation: false)"
        )
    for rec in records:
        act = found[rec["name"]]
        kept_note = getattr(_build_checked(rec), "injection_note", None)
        rec["notes"] = [n for n in rec["notes"] if n != kept_note]
        kind = type(model.get_submodule(act)).__name__
        rec["notes"].append(f"activation {act} ({kind}) removed: the layer's own replaces it")
        rec["activation"] = act


def plan_injection(
    model: nn.Module,
    rules: InjectionRules,
    *,
    example_input: Any = None,
    batch_size: int | None = None,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Decide the replacements for ``model``; changes nothing.

    Args:
        model: any ``nn.Module``.
        rules: the settings.
        example_input: an input for one eval forward, to probe layer input sizes (needed when a
            group count must divide ``D = C*S``, and to check carried modules on real shapes).
        batch_size: per-process batch size; ``auto`` group counts use the per-device batch
            ``batch_size / rules.virtual_devices``.

    Returns:
        ``(spec, kept_rows)``: the spec of the layers to replace and parameter normalizations to
        apply, and summary rows of target layers that stay as they are.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and rules.is_target(m)]
    kept: list[dict[str, str]] = []
    for name, module in model.named_modules():
        base = rules.untargeted_subclass(module) if name else None
        if base is not None:
            kept.append(
                {
                    "layer": name,
                    "old": type(module).__name__,
                    "new": "(kept)",
                    "args": f"a subclass of {base.__name__} not in norm.targets; add "
                    f"'{type(module).__module__}.{type(module).__name__}' to replace it",
                }
            )
    layer_rules = {name: rules.rule_for(name) for name, _ in candidates}
    needs_probe = any(
        arg.divides == "flat"
        for rule in layer_rules.values()
        if rule.method is not None
        for arg in norm_group_args(rule.method)
    )
    has_subclass = any(not type(m).__module__.startswith("torch.") for _, m in candidates)
    shapes: dict[str, tuple[int, ...]] = {}
    if example_input is not None and (needs_probe or has_subclass):
        shapes = probe_input_shapes(model, example_input, [n for n, _ in candidates])
    layers = []
    for name, old in candidates:
        rule = layer_rules[name]
        if rule.method is None:
            kept.append({"layer": name, "old": type(old).__name__, "new": "(kept)", "args": rule.reason})
        else:
            layers.append(
                _layer_record(rule, rules.group_fit, name, old, shapes.get(name), batch_size, rules.virtual_devices)
            )
    _find_convolutions(model, [rec for rec in layers if _needs_convolution(rec["method"])], example_input)
    if rules.remove_following_activation:
        _find_activations(model, layers, example_input)
    param_norms = [
        {"name": name, "kind": rules.param_norm}
        for name, module in model.named_modules()
        if name and rules.wants_param_norm(name, module)
    ]
    for message in rules.unmatched_patterns([n for n, _ in candidates]):
        warnings.warn(f"{message} matches no target layer", stacklevel=2)
    return {"version": SPEC_VERSION, "layers": layers, "param_norms": param_norms}, kept


def layer_args(model: nn.Module, record: Mapping[str, Any]) -> dict[str, Any]:
    """Every effective argument of the layer installed in ``model`` for the spec ``record``.

    Read from the built layer (``NormLayer.effective_args``: defaults and derived values included,
    e.g. ``gn``'s ``num_groups=32`` when none was given), not from the record, which holds what was
    asked. A plugin layer without ``effective_args`` shows the record's arguments.
    """
    layer = model.get_submodule(record["name"])
    if isinstance(layer, NormWithCarried):
        layer = layer.norm
    effective = getattr(layer, "effective_args", None)
    return effective() if callable(effective) else dict(record["kwargs"])


def summary_rows(
    model: nn.Module, spec: Mapping[str, Any], kept: Sequence[Mapping[str, str]] = ()
) -> list[dict[str, str]]:
    """Rows ``{layer, old, new, args}`` of ``spec`` as applied to ``model`` (replaced layers, then
    WS/WN layers), then ``kept``; ``args`` lists every effective argument of the built layer
    (:func:`layer_args`) and the record's notes."""
    rows = []
    for rec in spec["layers"]:
        args = ", ".join(f"{k}={v}" for k, v in layer_args(model, rec).items())
        notes = list(rec.get("notes", []))
        new = f"{norm_class_name(rec['method'])} ({rec['method']})"
        if rec.get("carried"):
            new += " + " + ", ".join(rec["carried"])
        rows.append(
            {
                "layer": rec["name"],
                "old": rec.get("old_type", "?"),
                "new": new,
                "args": args + (f"  [{'; '.join(notes)}]" if notes else ""),
            }
        )
    for rec in spec["param_norms"]:
        old = type(model.get_submodule(rec["name"])).__name__
        rows.append({"layer": rec["name"], "old": old, "new": f"{old} + {rec['kind']}", "args": ""})
    return rows + [dict(r) for r in kept]


def format_summary(rows: Sequence[Mapping[str, str]]) -> str:
    """Rows ``{layer, old, new, args}`` as a Markdown table (TensorBoard renders it)."""
    header = ("layer", "old type", "new type", "effective args")
    body = [(r["layer"], r["old"], r["new"], r["args"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)
