"""Count the ATen compute ops a normalization layer dispatches (issue 23's GPU-cost measure).

Each ATen op on a GPU is a kernel launch plus host-side dispatch, so a layer that dispatches many
small ops on per-channel statistics costs more there than its arithmetic. The count is
deterministic, so it is measured on CPU: every op that reaches the dispatcher under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` is counted, except views (ops whose
schema marks the output as an alias of an input: ``view``, ``reshape`` on contiguous data,
``permute``, ``expand``, ``detach``, ...) and bare allocations (``empty``, ``empty_strided``,
``new_empty_strided``, ``empty_like``) and ``_unsafe_view`` (a view whose schema does not say
so), which launch no kernel.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ComputeOpCounter", "LayerOpCounts", "count_layer_ops", "layer_op_counters", "NO_KERNEL"]


#: ops that launch no kernel although their schema is not a view's: allocations, ``_unsafe_view``
NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "_unsafe_view"})


class ComputeOpCounter(TorchDispatchMode):
    """Counts the non-view ATen ops dispatched while active; ``ops`` maps op name to count."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


@dataclass(frozen=True)
class LayerOpCounts:
    """Compute ops of one layer on one input: training forward, its backward, eval forward."""

    train_forward: int
    train_backward: int
    eval_forward: int

    @property
    def train(self) -> int:
        """Training forward + backward."""
        return self.train_forward + self.train_backward


def count_layer_ops(layer: nn.Module, x: Tensor) -> LayerOpCounts:
    """Compute ops of ``layer`` on ``x`` (:func:`layer_op_counters`), as totals."""
    fwd, bwd, ev = layer_op_counters(layer, x)
    return LayerOpCounts(fwd.total, bwd.total, ev.total)


def layer_op_counters(layer: nn.Module, x: Tensor) -> tuple[ComputeOpCounter, ComputeOpCounter, ComputeOpCounter]:
    """The counters of ``layer`` on ``x``: a training forward, the backward of an all-ones upstream
    gradient (made outside the count) into ``x`` and the parameters, and an eval forward under
    ``no_grad``. ``layer`` is left in eval mode; its running statistics move once.
    """
    x = x.detach().requires_grad_(True)
    layer.train()
    with ComputeOpCounter() as fwd:
        out = layer(x)
    g = torch.ones_like(out)
    with ComputeOpCounter() as bwd:
        out.backward(g)
    layer.eval()
    with torch.no_grad(), ComputeOpCounter() as ev:
        layer(x)
    return fwd, bwd, ev
