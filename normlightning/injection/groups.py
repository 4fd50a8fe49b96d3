"""Group counts of injected layers: routing ``num_groups``, resolving ``auto``, fitting to a layer.

The rules come from the layer classes' declarations (``group_args``, see
:mod:`normlightning.norms.group_args` and ``docs/methods.md``, "Group counts and auto rules");
this module applies them to one layer whose channels and input size are known.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from normlightning.norms import AutoContext, GroupArg, norm_group_args
from normlightning.norms.group_args import largest_divisor_at_most

__all__ = [
    "FIT_POLICIES",
    "FitPolicy",
    "check_required",
    "fit_groups",
    "per_device_batch_size",
    "resolve_groups",
    "route_num_groups",
]

FitPolicy = Literal["error", "nearest"]
FIT_POLICIES = ("error", "nearest")


def route_num_groups(method: str, declared: Sequence[GroupArg], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move the ``num_groups`` setting onto the counts ``method`` declares with ``takes_num_groups``
    (``gbgn``: ``channel_groups``; ``seqnorm``: both its counts, which only ``auto`` can set at once)."""
    kwargs = dict(kwargs)
    value = kwargs.pop("num_groups")
    targets = [arg.name for arg in declared if arg.takes_num_groups]
    if not targets:
        raise ValueError(f"norm.num_groups={value!r}: {method} takes no group count; remove num_groups for it")
    if len(targets) > 1 and not (isinstance(value, str) and value.startswith("auto")):
        raise ValueError(
            f"{method} takes {' and '.join(targets)} in norm.kwargs, not num_groups; num_groups: auto sets each to auto"
        )
    for target in targets:
        kwargs.setdefault(target, value)
    return kwargs


def check_required(where: str, method: str, declared: Sequence[GroupArg], kwargs: dict[str, Any]) -> None:
    """``ValueError`` naming the settings to give when ``kwargs`` lacks a count ``method`` declares
    ``required`` (one without a default, see ``docs/methods.md``, "Group counts without a default");
    ``where`` starts the message (``"layer 'x'"``, ``"norm.method"``)."""
    missing = [
        arg
        for arg in declared
        if arg.required and all(kwargs.get(name) is None for name in (arg.name, *arg.alternatives))
    ]
    if not missing:
        return
    fills = [arg for arg in declared if arg.takes_num_groups]
    ways = []
    if all(arg.takes_num_groups for arg in missing):
        if len(fills) == 1:
            ways.append("norm.num_groups (an int or auto)" if fills[0].auto else "norm.num_groups")
        elif all(arg.auto for arg in fills):
            ways.append(f"norm.num_groups: auto (sets {' and '.join(arg.name for arg in fills)})")
    ways.append(
        " and ".join("norm.kwargs." + " or norm.kwargs.".join((arg.name, *arg.alternatives)) for arg in missing)
    )
    raise ValueError(
        f"{where}: {method} has no default for {', '.join(arg.name for arg in missing)} (no single value is "
        f"right for every model and batch size); set {', or '.join(ways)} (per layer: the same keys in an override)"
    )


def per_device_batch_size(batch_size: int | None, virtual_devices: int) -> int | None:
    """The batch ``B / k`` that each of ``k = virtual_devices`` virtual devices computes its statistics
    on, which ``auto`` group counts use (``None`` stays ``None``: the batch size is unknown).

    Raises:
        ValueError: ``B`` does not split into ``k`` equal chunks (names ``data.batch_size`` and
            ``norm.virtual_devices``).
    """
    if batch_size is None or virtual_devices == 1:
        return batch_size
    if batch_size % virtual_devices:
        raise ValueError(
            f"norm: the per-process batch data.batch_size={batch_size} (or norm.batch_size) does not split into "
            f"norm.virtual_devices={virtual_devices} equal chunks; set data.batch_size to a multiple of "
            f"{virtual_devices}, or a norm.virtual_devices that divides it"
        )
    return batch_size // virtual_devices


def fit_groups(
    requested: int, total: int, *, policy: FitPolicy, layer: str, arg: str, what: str
) -> tuple[int, str | None]:
    """Fit a requested group count to a layer whose grouped size is ``total``.

    Args:
        requested: the configured count (``>= 1``).
        total: the size the groups must divide (``C`` for channel groups, ``D = C*S`` for bgn).
        policy: ``"error"`` raises when ``requested`` does not divide ``total``; ``"nearest"`` takes
            the largest divisor of ``total`` at or below ``requested``.
        layer, arg, what: for messages (module name, argument name, e.g. ``"D = C*H*W = 4096"``).

    Returns:
        ``(groups, note)``; ``note`` is ``None`` when the request fitted as is, else a short
        account of the change (it goes into the summary table).
    """
    if policy not in FIT_POLICIES:
        raise ValueError(f"norm.group_fit must be one of {FIT_POLICIES}, got {policy!r}")
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ValueError(f"{arg} for layer {layer!r} must be a positive int or 'auto', got {requested!r}")
    if total % requested == 0:
        return requested, None
    fitted = largest_divisor_at_most(total, requested)
    if policy == "error":
        raise ValueError(
            f"layer {layer!r}: {arg}={requested} does not divide {what}. Set a per-layer override for this "
            f"layer, or norm.group_fit=nearest to use the largest valid count at or below it ({fitted})."
        )
    return fitted, f"{arg} {requested}->{fitted} (must divide {what})"


def _probe_message(layer: str, arg: str) -> str:
    return (
        f"layer {layer!r}: fitting {arg} needs the layer's input size D=C*H*W; give the model an example "
        f"input (a LightningModule's `example_input_array`; ClassificationTask sets it from input_shape)"
    )


def resolve_groups(
    layer: str,
    method: str,
    kwargs: dict[str, Any],
    num_features: int,
    input_shape: Sequence[int] | None,
    batch_size: int | None,
    group_fit: FitPolicy,
) -> list[str]:
    """Replace ``auto`` and fit the group counts ``method`` declares, in ``kwargs`` (in place).

    Args:
        layer: module name (for messages).
        method: registry name.
        kwargs: the layer's requested keyword arguments.
        num_features: the layer's channels ``C``.
        input_shape: the layer's probed input shape ``(N, C, *spatial)`` (``None``: not probed).
        batch_size: per-process batch for ``auto`` rules (``None``: unknown).
        group_fit: policy for configured counts; ``auto`` results are always fitted (``nearest``).

    Returns:
        Notes for the summary table (``auto`` results and fitted changes).
    """
    check_required(f"layer {layer!r}", method, norm_group_args(method), kwargs)
    notes: list[str] = []
    spatial = None
    if input_shape is not None:
        spatial = 1
        for size in input_shape[2:]:
            spatial *= int(size)
    for arg in norm_group_args(method):
        value = kwargs.get(arg.name)
        if value is None:
            continue
        if isinstance(value, str):
            if value != "auto" and not value.startswith("auto:"):
                raise ValueError(
                    f"layer {layer!r}: {method} {arg.name}={value!r}; give an int, 'auto' or 'auto:<policy>'"
                )
            if not arg.auto:
                raise ValueError(f"layer {layer!r}: {method} {arg.name} has no 'auto' rule; give it an int")
            if batch_size is None:
                raise ValueError(
                    f"layer {layer!r}: {method} {arg.name}={value!r} needs the per-process batch size; set "
                    "norm.batch_size or use a DataModule with a `batch_size` attribute"
                )
            _, rule = arg.auto_rule(value.partition(":")[2] or None)
            if arg.divides == "flat" and spatial is None:
                raise ValueError(_probe_message(layer, arg.name))
            requested = rule(AutoContext(batch_size, num_features, spatial))
            notes.append(f"{arg.name} {value}->{requested} (B={batch_size})")
            if arg.divides == "batch":
                kwargs[arg.name] = requested
                continue
            policy: FitPolicy = "nearest"
        else:
            if arg.divides == "batch":
                continue
            requested, policy = value, group_fit
        if arg.divides == "channels":
            total, what = num_features, f"C={num_features}"
        else:
            if spatial is None:
                raise ValueError(_probe_message(layer, arg.name))
            total = num_features * spatial
            what = f"D=C*S={num_features}*{spatial}={total}"
        kwargs[arg.name], note = fit_groups(requested, total, policy=policy, layer=layer, arg=arg.name, what=what)
        if note:
            notes.append(note)
    return notes
