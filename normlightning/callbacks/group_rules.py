"""Group counts for injected layers: resolving ``auto`` and fitting a request to one layer.

The ``auto`` rules themselves are declared by the layer classes (``group_args``, see
:mod:`normlightning.norms.group_args`); this module only fits a requested count to a layer.
"""

from __future__ import annotations

from typing import Literal

from normlightning.norms.group_args import largest_divisor_at_most

FitPolicy = Literal["error", "nearest"]
FIT_POLICIES = ("error", "nearest")


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
        human-readable account of the change (it goes into the summary table).
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
