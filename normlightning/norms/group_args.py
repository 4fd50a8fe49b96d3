"""Group-count arguments that a normalization layer declares, with their ``auto`` rules.

A layer class lists its group counts in the class attribute ``group_args`` (a tuple of
:class:`GroupArg`); plugins registered with :func:`~normlightning.norms.register_norm` may do
the same on their factory. The injection, the sweep and the docs read these declarations
instead of keeping their own tables (see ``docs/methods.md``, "Group counts").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AutoContext",
    "GroupArg",
    "GroupTotal",
    "divisors",
    "group_args_of",
    "largest_divisor_at_most",
    "nearby_divisors",
]

#: What a group count must divide: the channels ``C``, the flattened ``D = C * S`` of the
#: layer's input (the injection then probes the input sizes), or the per-process batch
#: (never fitted per layer: the layer itself splits uneven batches).
GroupTotal = Literal["channels", "flat", "batch"]


@dataclass(frozen=True)
class AutoContext:
    """What an ``auto`` rule may look at for one layer.

    Attributes:
        batch_size: per-process batch ``B``.
        num_features: the layer's channels ``C``.
        spatial_size: ``S``, the product of the layer's input spatial sizes (``None`` when the
            input sizes were not probed; only rules of ``flat`` arguments need it).
    """

    batch_size: int
    num_features: int
    spatial_size: int | None = None


AutoRule = Callable[[AutoContext], int]


@dataclass(frozen=True)
class GroupArg:
    """One group-count keyword argument of a layer class.

    Attributes:
        name: the keyword argument of the layer's constructor (``num_groups``, ``channel_groups``).
        divides: what the count must divide (:data:`GroupTotal`).
        auto: named ``auto`` rules, ``AutoContext -> requested count``; the first one is what
            ``auto`` means, ``auto:<name>`` picks another. A requested count of a ``channels`` or
            ``flat`` argument is then fitted to the layer (largest divisor at or below it).
        takes_num_groups: the injection's ``norm.num_groups`` setting fills this argument.
        doc: one line for the docs and the injection summary.
        required: the layer has no default for this count (no single value is right for every
            model and batch size, ``docs/methods.md``, "Group counts without a default"); the
            injection refuses a layer without it, naming the setting that gives it.
        alternatives: other constructor arguments that set the same thing instead (``seqnorm``'s
            ``ghost_batch_size`` for ``batch_groups``); a required count given by one is present.
    """

    name: str
    divides: GroupTotal
    auto: Mapping[str, AutoRule] = field(default_factory=dict)
    takes_num_groups: bool = False
    doc: str = ""
    required: bool = False
    alternatives: tuple[str, ...] = ()

    def auto_rule(self, policy: str | None = None) -> tuple[str, AutoRule]:
        """``(policy name, rule)`` for ``auto`` (``policy=None``) or ``auto:<policy>``."""
        if not self.auto:
            raise ValueError(f"{self.name} has no 'auto' rule; give it an int")
        if policy is None:
            return next(iter(self.auto.items()))
        if policy not in self.auto:
            raise ValueError(
                f"{self.name}: unknown auto policy {policy!r}; valid: "
                + ", ".join(f"auto:{p}" for p in self.auto)
                + f" (plain 'auto' is auto:{next(iter(self.auto))})"
            )
        return policy, self.auto[policy]


def group_args_of(factory: Any) -> tuple[GroupArg, ...]:
    """The ``group_args`` declared by a layer class or plugin factory (``()`` when none)."""
    declared = getattr(factory, "group_args", ())
    if not all(isinstance(arg, GroupArg) for arg in declared):
        raise TypeError(f"{getattr(factory, '__name__', factory)}.group_args must be a tuple of GroupArg")
    return tuple(declared)


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def nearby_divisors(n: int, target: int, k: int = 12) -> list[int]:
    """The ``k`` divisors of ``n`` closest to ``target`` (ascending)."""
    divs = divisors(n)
    if len(divs) <= k:
        return divs
    return sorted(sorted(divs, key=lambda d: (abs(d - target), d))[:k])


def largest_divisor_at_most(total: int, limit: int) -> int:
    """The largest ``g`` with ``1 <= g <= limit`` and ``total % g == 0`` (``limit >= 1``, ``total >= 1``)."""
    if total < 1 or limit < 1:
        raise ValueError(f"need total >= 1 and limit >= 1, got total={total}, limit={limit}")
    return max(d for d in divisors(total) if d <= limit)
