"""Compute ops dispatched per layer (issue 23): the GPU launch cost, a deterministic count.

Every registered method, in the configurations of ``benchmarks/kernel_counts.py`` (the ones its
table reports), at both of its shapes: a training forward + backward dispatches at most
``TRAIN_TARGET`` = 24 compute ops and an eval forward at most ``EVAL_TARGET`` = 12, or, for the
methods that do not meet the targets yet, at most their recorded count (``OVER_TARGET``), so a
regression fails. The counter itself is checked against ops counted by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normlightning.norms import available_norms, build_norm
from normlightning.norms.op_count import ComputeOpCounter, count_layer_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_counts  # noqa: E402

#: (method, shape) -> (train fwd+bwd, eval fwd) upper bounds of the methods above the targets (the gap is
#: issue 23's remaining work; lower a bound when a change lowers the count), and the recorded counts of those
#: brought under them (so a regression fails)
OVER_TARGET = {
    ("brn", None): (23, 12),
    ("seqnorm", None): (63, 12),
    ("sn", None): (43, 12),
    # the small-batch baselines (issue 26)
    ("evonorm_b0", None): (24, 11),
    ("evonorm_s0", None): (24, 8),
    ("mabn", None): (20, 2),
}


def bound(name: str, kwargs: dict) -> tuple[int, int]:
    key = kwargs.get("num_groups") if name == "bgn" else kwargs.get("examples_per_group") if name == "gbgn" else None
    return OVER_TARGET.get((name, key), (kernel_counts.TRAIN_TARGET, kernel_counts.EVAL_TARGET))


def test_counter_counts_compute_ops_not_views_or_allocations():
    x = torch.randn(4, 6)
    with ComputeOpCounter() as c:
        y = (x.view(2, 12) * 2).t()  # mul; view and t: views
        z = y.reshape(24)  # of a transposed tensor: a copy (clone), then an _unsafe_view (no kernel)
        torch.empty(3)  # allocation: no kernel
        z.exp().sum()  # exp, sum
    assert dict(c.ops) == {"mul": 1, "clone": 1, "exp": 1, "sum": 1}
    assert c.total == 4


def test_native_batch_norm_counts():
    """Native BN: native_batch_norm + the num_batches_tracked add_; one backward kernel; one eval kernel."""
    counts = count_layer_ops(nn.BatchNorm2d(3), torch.randn(4, 3, 5, 5))
    assert (counts.train_forward, counts.train_backward, counts.eval_forward) == (2, 1, 1)


def _twice(t):
    return _once(_once(t))


def _once(t):
    return t


class _Scaled(nn.Module):
    """Multiplies by 2; with ``extra``, its forward also passes the result through three Python functions
    (``_twice``, which calls ``_once`` twice)."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.extra = extra
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x):
        y = x * self.weight
        return _twice(y) if self.extra else y


def test_python_calls_count_the_layers_python_functions_in_training_and_eval():
    """The benchmark's Python-call column: a layer whose forward makes three more Python calls counts three
    more in the training forward + backward and in the eval forward (the rest, e.g. ``Module.__call__`` and
    ``Tensor.backward``, is the same for both)."""
    x = torch.randn(2, 3)
    plain = kernel_counts.python_calls(_Scaled(extra=False), x)
    extra = kernel_counts.python_calls(_Scaled(extra=True), x)
    assert (extra[0] - plain[0], extra[1] - plain[1]) == (3, 3)
    assert min(plain) > 0


@pytest.mark.parametrize("shape", kernel_counts.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_method_within_its_op_count_bound(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    seen = set()
    for name, kwargs, layer in kernel_counts.layers(shape):
        seen.add(name)
        counts = count_layer_ops(layer, x)
        train_bound, eval_bound = bound(name, kwargs)
        assert counts.train <= train_bound, f"{name} {kwargs}: {counts.train} ops train fwd+bwd > {train_bound}"
        assert counts.eval_forward <= eval_bound, f"{name} {kwargs}: {counts.eval_forward} eval ops > {eval_bound}"
    assert seen >= set(available_norms())


@pytest.mark.parametrize(
    "name,kwargs", [("bgn", {"num_groups": 2}), ("gbgn", {"channel_groups": 2})], ids=["bgn", "gbgn"]
)
def test_groups_of_whole_channels_keep_only_the_input_for_backward(name, kwargs):
    """bgn with groups of whole channels and gbgn with ``E = N`` run their native kernels as one autograd node
    that saves, of full-size tensors, only the input, as ``nn.BatchNorm2d`` does (autograd of the two kernels
    also kept the normalized tensor: 1.5x the activation memory)."""
    x = torch.randn(4, 16, 3, 3, requires_grad=True)

    def full_size_saved(layer) -> int:
        storages = set()

        def pack(t):
            if t.numel() == x.numel():
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return len(storages)

    assert full_size_saved(nn.BatchNorm2d(16)) == 1
    assert full_size_saved(build_norm(name, 16, **kwargs)) == 1
