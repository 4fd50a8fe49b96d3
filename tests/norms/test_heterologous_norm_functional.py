"""``heterologous_norm``, ``heterologous_channel_statistics`` and ``parse_set_spec``
(norms/functional/heterologous_norm.py, docs/methods.md, section hn) against the definition written out here in
float64:

- a set ``kind:G`` of ``x (N, C, S)`` viewed as ``(N, G, C/G, S)``: the batch sets (``bn`` = ``en:C``, ``en:G``)
  over ``(N, C/G, S)`` per channel group, the per-example sets (``in`` = ``gn:C``, ``ln`` = ``gn:1``, ``gn:G``)
  over ``(C/G, S)`` per example and channel group; ``y = gamma_c (x - mu_S) / sqrt(var_S' + eps) + beta_c``, the
  variance of a std mixture ``sum_k softmax(logits)_k var_k``; the running buffers of the batch sets by PyTorch's
  update with the unbiased variance (``n = N (C/G) S``);
- the defaults of the optional arguments (``factor=0.1, eps=1e-5, sync=False``);
- inference from float32 running buffers on float64 input: read in float64; with batch sets only, the running
  statistics are constants per channel (not repeated per example);
- synchronized training over a simulated world of two processes holding the same batch (a recorded all-reduce
  that doubles sums and counts): every batch set all-reduced over the given ``process_group``, the per-example
  sets local, the running variances with twice the count;
- the messages of the set-size and spec errors.
"""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms.functional import heterologous_channel_statistics, heterologous_norm, parse_set_spec
from normlightning.norms.op_count import ComputeOpCounter

F64 = torch.float64
BATCH_SETS = ("bn", "en")


def _batch(N, C=4, spatial=(2, 3), seed=0):
    """``x (N, C, *spatial)`` with per-example and per-channel offsets, and an affine away from 0 and 1 (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, *spatial, generator=g, dtype=F64) * 2
    x = x + torch.arange(C, dtype=F64).view(1, C, *[1] * len(spatial))
    x = x + torch.arange(N, dtype=F64).view(N, 1, *[1] * len(spatial)) * 0.5
    w = torch.rand(C, generator=g, dtype=F64) + 1.5
    b = torch.randn(C, generator=g, dtype=F64)
    return x, w, b


def _set_moments(x, kind, G):
    """Mean and biased variance of each set ``kind:G`` of ``x``, spread to ``(N, C, S)``, and the set size."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, G, C // G, -1)
    dims = (0, 2, 3) if kind in BATCH_SETS else (2, 3)
    mean = xg.mean(dim=dims, keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=dims, keepdim=True)
    size = xg[0, 0].numel() * (N if kind in BATCH_SETS else 1)
    return mean.expand_as(xg).reshape(N, C, -1), var.expand_as(xg).reshape(N, C, -1), size


def _group_moments(x, G):
    """A batch set's mean and biased variance per channel group ``(G,)``."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, G, C // G, -1).transpose(0, 1).reshape(G, -1)
    mean = xg.mean(1)
    return mean, ((xg - mean[:, None]) ** 2).mean(1)


def reference_train(x, mean_set, std_sets, logits, w, b, eps):
    """The training output by the definition (float64)."""
    N, C = x.shape[:2]
    mu, _, _ = _set_moments(x, *mean_set)
    variances = [_set_moments(x, *s)[1] for s in std_sets]
    if logits is None:
        var = variances[0]
    else:
        weights = torch.softmax(logits.double(), 0)
        var = sum(weights[k] * v for k, v in enumerate(variances))
    y = (x.double().reshape(N, C, -1) - mu) / torch.sqrt(var + eps)
    return (y * w.view(1, C, 1) + b.view(1, C, 1)).reshape(x.shape)


def _spread(t, C):
    """``(G,)`` per channel group -> ``(1, C, 1)`` per channel."""
    return t.double().repeat_interleave(C // t.numel()).view(1, C, 1)


def test_training_defaults_are_momentum_0_1_and_eps_1e_5():
    """Without ``factor``/``eps``: ``eps = 1e-5`` in the output (variances near 1e-4), ``factor = 0.1`` in the
    update of the running mean (per channel, ``bn``) and running variance (unbiased, ``en:1``: one value)."""
    x, w, b = _batch(3)
    x = x * 5e-3
    rm, rv = torch.randn(4, dtype=F64), torch.rand(1, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = heterologous_norm(x, ("bn", 4), [("en", 1)], None, rm, [rv], w, b, True)
    torch.testing.assert_close(y, reference_train(x, ("bn", 4), [("en", 1)], None, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    mean, _ = _group_moments(x, 4)
    _, var = _group_moments(x, 1)
    n = x.numel()
    torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * var * n / (n - 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixture", [False, True])
def test_eval_reads_float32_running_buffers_in_the_input_dtype(mixture):
    """A float32 layer's buffers on float64 input: the running statistics of the batch sets are read in float64
    (``bn`` mean per channel, ``en:2`` variance per channel pair), a per-example std component (``in``) comes
    from the input, the output is float64."""
    x, w, b = _batch(3, seed=1)
    rm = torch.tensor([1.0, 3e-8, -2.0, 0.5], dtype=torch.float32)
    rv = torch.tensor([0.25, 2.0], dtype=torch.float32)
    std_sets = [("en", 2), ("in", 4)] if mixture else [("en", 2)]
    logits = torch.tensor([0.3, -0.4], dtype=F64) if mixture else None
    y = heterologous_norm(x, ("bn", 4), std_sets, logits, rm, [rv, None][: len(std_sets)], w, b, False, eps=1e-3)
    assert y.dtype == F64
    var = _spread(rv, 4)
    if mixture:
        weights = torch.softmax(logits, 0)
        var = weights[0] * var + weights[1] * _set_moments(x, "in", 4)[1]
    ref = (x.reshape(3, 4, -1) - _spread(rm, 4)) / torch.sqrt(var + 1e-3) * w.view(1, 4, 1) + b.view(1, 4, 1)
    torch.testing.assert_close(y, ref.reshape(x.shape), rtol=1e-13, atol=1e-13)


def test_eval_with_batch_sets_only_takes_the_running_statistics_once_per_channel():
    """Every set a batch set: the units are the channels, so the running statistics enter as ``C`` constants,
    not repeated for each example (no ``repeat``)."""
    x, w, b = _batch(3, seed=2)
    rm, rv = torch.randn(4, dtype=F64), torch.rand(2, dtype=F64) + 0.5
    with ComputeOpCounter() as counter:
        y = heterologous_norm(x, ("bn", 4), [("en", 2)], None, rm, [rv], w, b, False, eps=1e-3)
    assert counter.ops["repeat"] == 0
    ref = (x.reshape(3, 4, -1) - _spread(rm, 4)) / torch.sqrt(_spread(rv, 4) + 1e-3) * w.view(1, 4, 1) + b.view(1, 4, 1)
    torch.testing.assert_close(y, ref.reshape(x.shape), rtol=1e-13, atol=1e-13)


def test_channel_statistics_in_the_requested_dtype_with_the_mixture_weights_in_it():
    """``heterologous_channel_statistics`` from float32 buffers and logits, ``dtype=float64``: the mean and the
    ``softmax(logits)``-mixed variance per channel are computed and returned in float64 (a float32 softmax is off
    by about 1e-8)."""
    rm = torch.tensor([1.0, 3e-8], dtype=torch.float32)  # en:2 of 4 channels
    rv0 = torch.tensor([0.5, 2.0, 1.5, 3e-8], dtype=torch.float32)  # bn
    rv1 = torch.tensor([0.7], dtype=torch.float32)  # en:1
    logits = torch.tensor([0.3, -0.7], dtype=torch.float32)
    mean, var = heterologous_channel_statistics(("en", 2), [("bn", 4), ("en", 1)], logits, rm, [rv0, rv1], 4, F64)
    assert mean.dtype == var.dtype == F64
    weights = torch.softmax(logits.double(), 0)
    torch.testing.assert_close(mean, rm.double().repeat_interleave(2), rtol=1e-15, atol=1e-15)
    ref_var = weights[0] * rv0.double() + weights[1] * rv1.double().expand(4)
    torch.testing.assert_close(var, ref_var, rtol=1e-14, atol=1e-14)


# (mean set, std sets): per-example mean sets (their moments pooled from the (n, c) rows), per-example std sets of
# one group per example (ln), per channel (in) and per channel pair (gn:2), a std mixture, one std set
SYNCED = [
    (("in", 4), [("bn", 4)]),
    (("gn", 2), [("en", 2), ("in", 4)]),
    (("bn", 4), [("gn", 2)]),
    (("ln", 1), [("en", 1)]),
    (("bn", 4), [("bn", 4), ("in", 4), ("ln", 1)]),
]


def _buffers(mean_set, std_sets, seed):
    """A running buffer ``(G,)`` for each batch set, ``None`` for the per-example ones."""
    g = torch.Generator().manual_seed(seed)

    def make(kind, G, offset):
        return torch.rand(G, generator=g, dtype=F64) + offset if kind in BATCH_SETS else None

    return make(*mean_set, -0.5), [make(*s, 0.5) for s in std_sets]


@pytest.mark.parametrize("mean_set, std_sets", SYNCED)
def test_synchronized_batch_sets_are_all_reduced_over_the_given_group(mean_set, std_sets, two_process_world):
    """``sync=True`` in training: two all-reduces (mean, then centred squares) per batch set, over
    ``process_group``, none for the per-example sets; with the other process holding the same batch the output is
    the local definition (affine applied, float32 mixture logits softmaxed in float64) and each running variance
    is updated with the union's count ``2 N (C/G) S``."""
    group = object()
    x, w, b = _batch(3, seed=3)
    rm, rvs = _buffers(mean_set, std_sets, seed=4)
    rm0, rv0s = (None if rm is None else rm.clone()), [None if r is None else r.clone() for r in rvs]
    logits = None if len(std_sets) == 1 else torch.linspace(0.4, -0.3, len(std_sets), dtype=torch.float32)
    y = heterologous_norm(
        x, mean_set, std_sets, logits, rm, rvs, w, b, True, factor=0.25, eps=1e-3, sync=True, process_group=group
    )
    batch_sets = sum(kind in BATCH_SETS for kind, _ in (mean_set, *std_sets))
    assert two_process_world.groups == [group] * (2 * batch_sets)
    torch.testing.assert_close(y, reference_train(x, mean_set, std_sets, logits, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    if rm is not None:
        torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * _group_moments(x, mean_set[1])[0], rtol=1e-12, atol=1e-12)
    for (_, G), rv, rv0 in zip(std_sets, rvs, rv0s):
        if rv is not None:
            n = 2 * x.numel() // G
            var = _group_moments(x, G)[1] * n / (n - 1)
            torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * var, rtol=1e-12, atol=1e-12)


def test_synchronized_per_example_sets_need_no_communication(two_process_world):
    """``sync=True`` with only per-example sets: no all-reduce, the local definition."""
    x, w, b = _batch(3, seed=5)
    y = heterologous_norm(x, ("in", 4), [("gn", 2)], None, None, [None], w, b, True, eps=1e-3, sync=True)
    assert two_process_world.groups == []
    torch.testing.assert_close(y, reference_train(x, ("in", 4), [("gn", 2)], None, w, b, 1e-3), rtol=1e-12, atol=1e-12)


def test_statistics_are_local_by_default_in_an_initialized_world(two_process_world):
    """``sync`` defaults to False: no all-reduce even with a process group up; the running variance is updated
    with the local count ``N C S``."""
    x, w, b = _batch(3, seed=6)
    rm, rv = torch.zeros(4, dtype=F64), torch.ones(1, dtype=F64)
    y = heterologous_norm(x, ("bn", 4), [("en", 1)], None, rm, [rv], w, b, True, factor=0.5, eps=1e-3)
    assert two_process_world.groups == []
    torch.testing.assert_close(y, reference_train(x, ("bn", 4), [("en", 1)], None, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    n = x.numel()
    torch.testing.assert_close(rv, 0.5 + 0.5 * _group_moments(x, 1)[1] * n / (n - 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "shape, mean_set, std_sets, name",
    [
        ((1, 4), ("bn", 4), [("en", 1)], "bn"),  # one example, one channel per set: N * 1 * 1
        ((1, 4), ("ln", 1), [("en", 4)], "en:4"),
        ((2, 4), ("bn", 4), [("gn", 4)], "gn:4"),
        ((3, 4), ("in", 4), [("ln", 1)], "in"),
    ],
)
def test_sets_of_one_element_are_refused_naming_the_set(shape, mean_set, std_sets, name):
    """In training a set (mean or std side) of ``(N if batch set) * C/G * S = 1`` value is refused, the message
    naming the set as it is spelt (``:G`` for ``gn``/``en`` only) and the input's shape."""
    x = torch.randn(*shape, dtype=F64)
    message = (
        f"HeterologousNorm set {name} has one element for input of shape {shape} in training; choose a larger set "
        "(e.g. 'en:1' or 'ln') or a larger input."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        heterologous_norm(x, mean_set, std_sets, None, None, [None] * len(std_sets), None, None, True)


def test_sets_of_two_values_are_accepted():
    """One example, one channel per ``bn`` set, ``S = 2``: a set of two values is valid."""
    x, w, b = _batch(1, spatial=(2,))
    y = heterologous_norm(x, ("bn", 4), [("in", 4)], None, torch.zeros(4, dtype=F64), [None], w, b, True, eps=1e-3)
    torch.testing.assert_close(y, reference_train(x, ("bn", 4), [("in", 4)], None, w, b, 1e-3), rtol=1e-12, atol=1e-12)


def test_an_unknown_set_lists_the_valid_sets():
    """The spec error for an unknown set names the spec, the bad part and the valid syntax."""
    message = (
        "HeterologousNorm std='bn+xn': unknown set 'xn'; valid sets: bn, in, ln, gn:G, en:G (G divides C), "
        "joined by '+' for std mixtures."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_set_spec("bn+xn", 4, allow_mixture=True, role="std")
