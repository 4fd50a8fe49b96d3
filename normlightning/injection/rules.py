"""The injection's settings: which layers to replace, by what, with which arguments.

:class:`InjectionRules` validates the settings once and answers, per module name, the method
and requested keyword arguments (:meth:`InjectionRules.rule_for`). Group counts (``auto``,
fitting) are resolved later, per layer, by :mod:`normlightning.injection.groups`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from normlightning.injection.groups import FIT_POLICIES, check_required, route_num_groups
from normlightning.norms import norm_group_args

__all__ = ["DEFAULT_PARAM_NORM_TARGETS", "DEFAULT_TARGETS", "InjectionRules", "LayerRule", "resolve_type"]

#: Layer classes replaced by default, matched by exact type. The timm class is used when timm
#: is installed (its norm + dropout + activation layers: our layer is followed by the same
#: dropout and activation, see :mod:`normlightning.injection.carry`).
DEFAULT_TARGETS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "timm.layers.BatchNormAct2d")
DEFAULT_PARAM_NORM_TARGETS = ("Conv1d", "Conv2d", "Conv3d")
PARAM_NORM_KINDS = ("weight_standardization", "weight_norm", "weight_centering")


def resolve_type(name: str, *, optional: bool = False) -> type[nn.Module] | None:
    """``"BatchNorm2d"`` -> ``torch.nn.BatchNorm2d``; ``"pkg.mod.Cls"`` -> that class.

    ``optional``: return ``None`` when the class's package is not installed (instead of raising).
    """
    if "." not in name:
        cls = getattr(nn, name, None)
    else:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            if optional:
                return None
            cls = None
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(
            f"norm target type {name!r} is not a torch.nn module class; use a torch.nn class name such as "
            f"'BatchNorm2d', 'GroupNorm', 'LayerNorm', 'InstanceNorm2d', or a dotted path 'package.module.Class'"
        )
    return cls


def _compile(pattern: str, setting: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"{setting}: {pattern!r} is not a valid regular expression ({err})") from err


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and (value == "auto" or value.startswith("auto:"))


@dataclass(frozen=True)
class LayerRule:
    """What to do with one target layer: ``method`` (``None`` = keep it), the requested keyword
    arguments (group counts may still be ``auto``), and why (``global``, ``override i``, ``excluded``)."""

    method: str | None
    kwargs: dict[str, Any]
    reason: str


def _check_method(method: str | None, setting: str) -> None:
    """A ``ValueError`` naming ``setting`` and listing the registered names when ``method`` is not
    one (``None``: no method, nothing to check). Plugins register before the rules are built."""
    if method is None:
        return
    try:
        norm_group_args(method)
    except ValueError as err:
        raise ValueError(f"{setting}: {err}") from None


class InjectionRules:
    """Validated injection settings (the ``norm:`` section, without the Lightning parts).

    Args:
        method: registry name of the new layers (``None``: keep every layer unless an override
            names a method).
        num_groups: the method's group count (an int, ``auto`` or ``auto:<policy>``), routed to the
            arguments the layer class declares with ``takes_num_groups``.
        kwargs: further ``build_norm`` keyword arguments.
        targets: classes to replace (``torch.nn`` names or dotted paths), matched by exact type.
        overrides: ``[{pattern, method?, <kwarg>: value}]``; the first ``re.fullmatch`` wins.
        exclude: regexes of target layers to keep.
        group_fit: ``error`` or ``nearest`` for a configured count that does not divide.
        copy_state: copy affine parameters and same-named buffers from the replaced layers.
        param_norm: ``weight_standardization``, ``weight_norm``, ``weight_centering`` or ``None``.
        param_norm_targets, param_norm_exclude: which layers get ``param_norm``.
        virtual_devices: ``k``: the replaced layers with batch statistics compute them per ``k``
            equal chunks of each training batch, as ``k`` DDP processes (``virtual_devices`` of
            :class:`~normlightning.norms.BatchStatNorm`); ``auto`` group counts see the batch ``B/k``.
        remove_following_activation: replace the activation module after each layer that applies
            its own (``frn``'s TLU) by ``nn.Identity`` (:mod:`normlightning.injection.activations`).
    """

    def __init__(
        self,
        method: str | None = None,
        num_groups: int | str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        targets: Sequence[str] | None = None,
        overrides: Sequence[Mapping[str, Any]] | None = None,
        exclude: Sequence[str] | None = None,
        group_fit: str = "error",
        copy_state: bool = True,
        param_norm: str | None = None,
        param_norm_targets: Sequence[str] | None = None,
        param_norm_exclude: Sequence[str] | None = None,
        virtual_devices: int = 1,
        remove_following_activation: bool = False,
    ) -> None:
        if group_fit not in FIT_POLICIES:
            raise ValueError(f"norm.group_fit must be one of {FIT_POLICIES}, got {group_fit!r}")
        if (
            num_groups is not None
            and not _is_auto(num_groups)
            and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1)
        ):
            raise ValueError(
                f"norm.num_groups must be a positive int, 'auto', 'auto:<policy>' or null, got {num_groups!r}"
            )
        if param_norm is not None and param_norm not in PARAM_NORM_KINDS:
            raise ValueError(f"unknown parameter normalization {param_norm!r}; valid: {', '.join(PARAM_NORM_KINDS)}")
        if isinstance(virtual_devices, bool) or not isinstance(virtual_devices, int) or virtual_devices < 1:
            raise ValueError(
                f"norm.virtual_devices must be a positive int (1: the whole batch), got {virtual_devices!r}"
            )
        in_overrides = any(isinstance(o, Mapping) and "virtual_devices" in o for o in overrides or [])
        if "virtual_devices" in (kwargs or {}) or in_overrides:
            raise ValueError("set norm.virtual_devices, not virtual_devices in norm.kwargs or norm.overrides")
        _check_method(method, "norm.method")
        self.method = method
        self.num_groups = num_groups
        self.kwargs = dict(kwargs or {})
        self.targets = tuple(targets) if targets is not None else DEFAULT_TARGETS
        optional = targets is None  # only the defaults may name a package that is not installed
        self.target_types = tuple(
            t for t in (resolve_type(n, optional=optional) for n in self.targets) if t is not None
        )
        self.overrides = [self._check_override(i, o) for i, o in enumerate(overrides or [])]
        self.exclude = [_compile(p, "norm.exclude") for p in (exclude or [])]
        if not isinstance(remove_following_activation, bool):
            raise ValueError(
                f"norm.remove_following_activation must be true or false, got {remove_following_activation!r}"
            )
        self.remove_following_activation = remove_following_activation
        self.group_fit = group_fit
        self.copy_state = copy_state
        self.virtual_devices = virtual_devices
        self.param_norm = param_norm
        names = param_norm_targets if param_norm_targets is not None else DEFAULT_PARAM_NORM_TARGETS
        self.param_norm_types = tuple(resolve_type(t) for t in names)
        self.param_norm_exclude = [_compile(p, "norm.param_norm_exclude") for p in (param_norm_exclude or [])]
        if method is not None and not self.overrides:  # every layer gets these settings: check them now
            declared = norm_group_args(method)
            base = dict(self.kwargs)
            if num_groups is not None:
                base = route_num_groups(method, declared, {**base, "num_groups": num_groups})
            check_required("norm.method", method, declared, base)

    @property
    def changes_nothing(self) -> bool:
        """No method, no override and no parameter normalization: the model stays as it is."""
        return self.method is None and not self.overrides and self.param_norm is None

    @staticmethod
    def _check_override(index: int, override: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(override, Mapping) or "pattern" not in override:
            raise ValueError(
                f"norm.overrides[{index}] must be a mapping with a 'pattern' key, e.g. "
                f"{{pattern: 'layer4\\\\..*', method: gn, num_groups: 32}}; got {override!r}"
            )
        out = dict(override)
        out["pattern"] = _compile(out["pattern"], f"norm.overrides[{index}].pattern")
        _check_method(out.get("method"), f"norm.overrides[{index}].method")
        return out

    def is_target(self, module: nn.Module) -> bool:
        """A module whose exact type is one of the targets."""
        return type(module) in self.target_types

    def untargeted_subclass(self, module: nn.Module) -> type[nn.Module] | None:
        """The target class that ``module``'s class extends when ``module`` is not itself a target
        (e.g. a custom ``BatchNorm2d`` subclass); ``None`` otherwise."""
        if self.is_target(module):
            return None
        return next((t for t in self.target_types if isinstance(module, t)), None)

    def rule_for(self, name: str) -> LayerRule:
        """The rule for the target module ``name`` (the first fully matching override wins)."""
        if any(p.fullmatch(name) for p in self.exclude):
            return LayerRule(None, {}, "excluded")
        base = dict(self.kwargs)
        if self.num_groups is not None:
            base["num_groups"] = self.num_groups
        method, kwargs, reason = self.method, base, "global"
        for i, override in enumerate(self.overrides):
            if override["pattern"].fullmatch(name):
                extra = {k: v for k, v in override.items() if k not in ("pattern", "method")}
                if "method" in override and override["method"] != self.method:
                    method, kwargs = override["method"], extra
                else:
                    kwargs = {**base, **extra}
                reason = f"override {i}"
                break
        if method is None:
            return LayerRule(None, {}, reason)
        try:
            declared = norm_group_args(method)
        except ValueError as err:
            raise ValueError(f"norm: cannot build {method!r} for layer {name!r}: {err}") from None
        if "num_groups" in kwargs:
            kwargs = route_num_groups(method, declared, kwargs)
        return LayerRule(method, kwargs, reason)

    def unmatched_patterns(self, names: Sequence[str]) -> list[str]:
        """``exclude`` / ``overrides`` patterns that match none of ``names`` (for a warning)."""
        out = []
        for setting, patterns in (
            ("norm.exclude", self.exclude),
            ("norm.overrides", [o["pattern"] for o in self.overrides]),
        ):
            out += [f"{setting}: pattern {p.pattern!r}" for p in patterns if not any(p.fullmatch(n) for n in names)]
        return out

    def wants_param_norm(self, name: str, module: nn.Module) -> bool:
        """Whether the module ``name`` gets the configured parameter normalization."""
        return (
            self.param_norm is not None
            and isinstance(module, self.param_norm_types)
            and not any(p.fullmatch(name) for p in self.param_norm_exclude)
        )
