"""``general_batch_group_norm`` and ``general_batch_group_channel_statistics``
(norms/functional/general_batch_group_norm.py, docs/methods.md, section gbgn) against the definition written
out here in float64:

- training: the batch cut into ``k = ceil(N/E)`` contiguous example groups of nearly equal sizes (the first
  ``N mod k`` one larger), the channels into ``G_C`` groups; per (example group, channel group) block the mean
  and biased variance over ``(examples, C/G_C, S)``; ``y = gamma_c (x - mu) / sqrt(var + eps) + beta_c``; the
  raw per-channel moments ``E[x]``, ``E[x^2]`` over ``(N, S)`` lerped into ``moving_x``/``moving_x2``;
- eval: the buffers averaged over each channel group, ``var = max(m2 - m1^2, 0)``, mixed with the example's own
  moments over ``(C/G_C, S)`` by ``alpha``;
- the defaults of the optional arguments (``factor=0.01, eps=1e-5, alpha=0, sync=False``);
- buffers of another dtype than the input (a float32 layer fed float64): read and updated in their own dtype,
  the statistics computed in the input's;
- synchronized statistics over a simulated world of two processes holding the same batch (a recorded
  all-reduce that doubles sums and counts), all over the given ``process_group``;
- the set-size error message; the one-group path's statistics used as they are (no concatenation).
"""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms.functional import general_batch_group_channel_statistics, general_batch_group_norm
from normlightning.norms.op_count import ComputeOpCounter

F64 = torch.float64


def _batch(N, C=4, spatial=(2, 3), seed=0, dtype=F64):
    """``x (N, C, *spatial)`` with per-channel offsets, raw-moment buffers, and an affine away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(C, dtype=F64).view(1, C, *[1] * len(spatial))
    x = torch.randn(N, C, *spatial, generator=g, dtype=F64) * 2 + offsets
    mx = torch.randn(C, generator=g, dtype=F64)
    mx2 = mx * mx + torch.rand(C, generator=g, dtype=F64) + 0.5
    w = torch.rand(C, generator=g, dtype=F64) + 1.5
    b = torch.randn(C, generator=g, dtype=F64)
    return x.to(dtype), mx.to(dtype), mx2.to(dtype), w.to(dtype), b.to(dtype)


def _group_bounds(N, E):
    """Contiguous example groups: ``ceil(N/E)`` groups of nearly equal size, the first ``N mod k`` one larger."""
    k = (N + E - 1) // E
    base, extra = N // k, N % k
    bounds, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        bounds.append((start, start + size))
        start += size
    return bounds


def reference_train(x, Gc, E, w, b, eps):
    """The training output by the definition (float64)."""
    N, C = x.shape[:2]
    x3 = x.double().reshape(N, C, -1)
    y = torch.empty_like(x3)
    for lo, hi in _group_bounds(N, N if E is None else E):
        block = x3[lo:hi].reshape(hi - lo, Gc, C // Gc, -1)
        mean = block.mean(dim=(0, 2, 3), keepdim=True)
        var = ((block - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        y[lo:hi] = ((block - mean) / torch.sqrt(var + eps)).reshape(hi - lo, C, -1)
    y = y * w.double().view(1, C, 1) + b.double().view(1, C, 1)
    return y.reshape(x.shape)


def raw_moments(x):
    """``E[x]`` and ``E[x^2]`` per channel over ``(N, S)`` (float64)."""
    x3 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return x3.mean(1), (x3 * x3).mean(1)


def reference_eval(x, Gc, mx, mx2, w, b, eps, alpha):
    """The inference output by the definition (float64)."""
    N, C = x.shape[:2]
    xg = x.double().reshape(N, Gc, -1)
    m1 = mx.double().view(Gc, -1).mean(1).view(1, Gc, 1)
    m2 = mx2.double().view(Gc, -1).mean(1).view(1, Gc, 1)
    mu = (1 - alpha) * m1 + alpha * xg.mean(2, keepdim=True)
    s = (1 - alpha) * m2 + alpha * (xg * xg).mean(2, keepdim=True)
    var = (s - mu * mu).clamp_min(0.0)
    y = ((xg - mu) / torch.sqrt(var + eps)).reshape(N, C, -1)
    return (y * w.double().view(1, C, 1) + b.double().view(1, C, 1)).reshape(x.shape)


def test_training_defaults_are_momentum_one_hundredth_and_eps_1e_5():
    """Without ``factor``/``eps``: ``eps = 1e-5`` in the output, ``factor = 0.01`` in the buffers' update."""
    x, mx, mx2, w, b = _batch(6, spatial=(1,))
    x = x * 1e-2  # variances near 1e-4: eps = 1e-5 shows in the output
    mx0, mx20 = mx.clone(), mx2.clone()
    y = general_batch_group_norm(x, 2, None, mx, mx2, w, b, True)
    torch.testing.assert_close(y, reference_train(x, 2, None, w, b, 1e-5), rtol=1e-12, atol=1e-12)
    m1, m2 = raw_moments(x)
    torch.testing.assert_close(mx, 0.99 * mx0 + 0.01 * m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx2, 0.99 * mx20 + 0.01 * m2, rtol=1e-12, atol=1e-12)


def test_eval_default_is_the_population_moments_alone():
    """``alpha`` defaults to 0: at inference nothing of the example's own moments is mixed in."""
    x, mx, mx2, w, b = _batch(3, seed=1)
    x = x * 3 + 5  # examples far from the buffers' moments
    y = general_batch_group_norm(x, 2, None, mx, mx2, w, b, False)
    torch.testing.assert_close(y, reference_eval(x, 2, mx, mx2, w, b, 1e-5, 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_eval_averages_float32_buffers_in_the_input_dtype(alpha):
    """A float32 layer's buffers on float64 input: the channel-group averages are taken in float64 (a float32
    sum of 1 and 3e-8 drops the 3e-8, 1.5e-8 of the mean)."""
    x, _, _, w, b = _batch(2, seed=2)
    mx = torch.tensor([1.0, 3e-8, -2.0, 3e-8], dtype=torch.float32)
    mx2 = torch.tensor([4.0, 3e-8, 8.0, 3e-8], dtype=torch.float32)
    y = general_batch_group_norm(x, 2, None, mx, mx2, w, b, False, eps=1e-3, alpha=alpha)
    assert y.dtype == F64
    torch.testing.assert_close(y, reference_eval(x, 2, mx, mx2, w, b, 1e-3, alpha), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("E", [None, 2, 4])  # the whole batch, 3 groups of 2, E not dividing N (groups of 3 + 3)
def test_training_updates_float32_buffers_from_float64_input(E):
    """A float32 layer's buffers on float64 input: updated in float32 with the float64 batch moments."""
    x, mx, mx2, w, b = _batch(6, seed=3)
    mx, mx2 = mx.float(), mx2.float()
    mx0, mx20 = mx.double(), mx2.double()
    y = general_batch_group_norm(x, 2, E, mx, mx2, w, b, True, factor=0.25, eps=1e-3)
    assert y.dtype == F64 and mx.dtype == mx2.dtype == torch.float32
    torch.testing.assert_close(y, reference_train(x, 2, E, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    m1, m2 = raw_moments(x)
    torch.testing.assert_close(mx.double(), 0.75 * mx0 + 0.25 * m1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mx2.double(), 0.75 * mx20 + 0.25 * m2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("E", [6, 9])
def test_one_example_group_of_the_whole_batch(E):
    """``E >= N``: one example group (``ceil(N/E) = 1``), BN over channel groups; ``E > N`` goes through the
    moments path with its one chunk, whose statistics are used as they are (no concatenation op)."""
    x, mx, mx2, w, b = _batch(6, seed=4)
    with ComputeOpCounter() as counter:
        y = general_batch_group_norm(x, 2, E, mx, mx2, w, b, True, factor=0.5, eps=1e-3)
    torch.testing.assert_close(y, reference_train(x, 2, None, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    assert counter.ops["cat"] == 0


def test_smallest_sets_of_two_values_are_accepted():
    """A set of ``examples * C/G_C * S = 2`` values is valid: one example, two channels per group, ``S = 1``."""
    x, mx, mx2, w, b = _batch(1, spatial=())
    y = general_batch_group_norm(x, 2, None, mx, mx2, w, b, True, eps=1e-3)
    torch.testing.assert_close(y, reference_train(x, 2, None, w, b, 1e-3), rtol=1e-12, atol=1e-12)


def test_sets_of_one_element_are_refused_naming_the_settings():
    """N = 3 in groups of E = 2 (sizes 2 and 1), one channel per group, ``(N, C)`` input: the second example
    group's sets hold 1 value."""
    x, mx, mx2, w, b = _batch(3, spatial=())
    message = (
        "GeneralBatchGroupNorm with N=3, examples_per_group=2, C/G_C=1, S=1 has 1 element(s) per normalization "
        "set; a set needs more than 1 value (its variance is undefined). "
        "Use more examples per group or fewer channel groups."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        general_batch_group_norm(x, 4, 2, mx, mx2, w, b, True)


def test_channel_statistics_in_the_requested_dtype_with_variance_clamped_at_zero():
    """Per channel group: ``mean(m1)``, ``max(mean(m2) - mean(m1)^2, 0)`` spread to the group's channels, computed
    and returned in ``dtype`` (float64 here, from float32 buffers: the 3e-8 that a float32 sum drops shows)."""
    mx = torch.tensor([1.0, 3e-8, 2.0, 2.0, 0.5, 0.5], dtype=torch.float32)
    mx2 = torch.tensor([1.5, 3e-8, 3.0, 3.0, 0.5, 0.5], dtype=torch.float32)  # variances: small, negative, 0.25
    mean, var = general_batch_group_channel_statistics(mx, mx2, 3, F64)
    assert mean.dtype == var.dtype == F64
    m1 = mx.double().view(3, 2).mean(1)
    v = (mx2.double().view(3, 2).mean(1) - m1 * m1).clamp_min(0.0)
    assert v[1] == 0 and 0 < v[2] < 1 and 0 < v[0] < 1
    torch.testing.assert_close(mean, m1.repeat_interleave(2), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(var, v.repeat_interleave(2), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("E, groups", [(None, 1), (3, 2), (4, 2)])
def test_synchronized_statistics_are_all_reduced_over_the_given_group(E, groups, two_process_world):
    """``sync=True``: per example group two all-reduces (mean, then centred squares), and one for the raw
    moments of the buffers, all over ``process_group``; with the other process holding the same batch the
    output and buffers are the local ones."""
    group = object()
    x, mx, mx2, w, b = _batch(6, seed=5)
    mx0, mx20 = mx.clone(), mx2.clone()
    y = general_batch_group_norm(x, 2, E, mx, mx2, w, b, True, factor=0.25, eps=1e-3, sync=True, process_group=group)
    assert two_process_world.groups == [group] * (2 * groups + 1)
    torch.testing.assert_close(y, reference_train(x, 2, E, w, b, 1e-3), rtol=1e-12, atol=1e-12)
    m1, m2 = raw_moments(x)
    torch.testing.assert_close(mx, 0.75 * mx0 + 0.25 * m1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mx2, 0.75 * mx20 + 0.25 * m2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("E", [None, 3, 4])
def test_statistics_are_local_by_default_in_an_initialized_world(E, two_process_world):
    """``sync`` defaults to False: no all-reduce even with a process group up."""
    x, mx, mx2, w, b = _batch(6, seed=6)
    y = general_batch_group_norm(x, 2, E, mx, mx2, w, b, True, eps=1e-3)
    assert two_process_world.groups == []
    torch.testing.assert_close(y, reference_train(x, 2, E, w, b, 1e-3), rtol=1e-12, atol=1e-12)
