"""``sequential_norm`` (norms/functional/sequential_norm.py, docs/methods.md, section seqnorm) against GN-then-BN
written out here in float64:

- GN without affine over ``G_C`` channel groups (per example, over ``(C/G_C, S)``), then per ghost batch ``j``
  (the examples ``n = j (mod G_M)``; when ``G_M`` does not divide ``N`` the first ``N mod G_M`` hold one more)
  BN per channel over its ``(N/G_M, S)`` values with the per-channel affine, both with the same ``eps``; the
  running statistics get the mean of the ghost means and of the ghost unbiased variances; eval: GN, then BN with
  the running statistics;
- which path trains: native GN then ghost BN below :data:`SEQNORM_FUSED_MIN_NUMEL` values, when ``G_M`` does not
  divide ``N`` or with ``sync``; otherwise the fused node (no GN kernel), from exactly that many values on;
- the defaults of ``factor``, ``eps`` and ``sync``;
- synchronized training over a simulated world of two processes holding the same batch (a recorded all-reduce
  that doubles sums and counts): the ghost statistics all-reduced over the given ``process_group``, the GN stage
  local, the running variance with twice the count.
"""

from __future__ import annotations

import pytest
import torch

from normlightning.norms.functional import sequential_norm
from normlightning.norms.functional.sequential_norm import SEQNORM_FUSED_MIN_NUMEL
from normlightning.norms.op_count import ComputeOpCounter

F64 = torch.float64
C = 4


def _batch(N, S, seed=0):
    """``x (N, C, S)`` with per-example and per-channel offsets and scales, an affine away from 0 and 1, and
    running statistics (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, S, generator=g, dtype=F64) * (1 + torch.arange(C, dtype=F64).view(1, C, 1))
    x = x + torch.arange(C, dtype=F64).view(1, C, 1) + torch.arange(N, dtype=F64).view(N, 1, 1) * 0.5
    w = torch.rand(C, generator=g, dtype=F64) + 1.5
    b = torch.randn(C, generator=g, dtype=F64)
    rm = torch.randn(C, generator=g, dtype=F64)
    rv = torch.rand(C, generator=g, dtype=F64) + 0.5
    return x, w, b, rm, rv


def _group_norm(x, channel_groups, eps):
    """GN without affine: per example and channel group over ``(C/G_C, S)``, biased variance."""
    N = x.shape[0]
    xg = x.double().reshape(N, channel_groups, -1)
    mean = xg.mean(2, keepdim=True)
    var = ((xg - mean) ** 2).mean(2, keepdim=True)
    return ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)


def reference_train(x, channel_groups, G, w, b, eps, copies=1):
    """The training output by the definition (float64), and the mean of the ghost batches' means and of their
    unbiased variances (``copies`` processes holding the same batch: the count ``copies (N/G_M) S``)."""
    h = _group_norm(x, channel_groups, eps)
    y = torch.empty_like(h)
    means, uvars = [], []
    for j in range(G):
        hj = h[j::G]
        mean = hj.mean((0, 2), keepdim=True)
        var = ((hj - mean) ** 2).mean((0, 2), keepdim=True)
        y[j::G] = (hj - mean) / torch.sqrt(var + eps) * w.view(1, -1, 1) + b.view(1, -1, 1)
        n = copies * hj.shape[0] * hj.shape[2]
        means.append(mean.view(-1))
        uvars.append(var.view(-1) * n / (n - 1))
    return y, torch.stack(means).mean(0), torch.stack(uvars).mean(0)


# (N, G_M, S): small inputs (native kernels) with G_M dividing N or not; inputs of at least the fused threshold
# with G_M dividing N (the fused node, at exactly the threshold too) or not (native kernels)
CASES = [
    (4, 2, 6),
    (5, 2, 3),
    (4, 2, SEQNORM_FUSED_MIN_NUMEL // (4 * C)),
    (4, 2, SEQNORM_FUSED_MIN_NUMEL // (4 * C) + 1),
    (3, 2, SEQNORM_FUSED_MIN_NUMEL // (3 * C) + 1),
]


@pytest.mark.parametrize("N, G, S", CASES)
def test_training_is_group_norm_then_ghost_batch_norm(N, G, S):
    """Training: the output is GN (2 channel groups, no affine) followed by BN per ghost batch with the affine,
    ``eps`` in both stages; the running statistics move by ``factor`` towards the mean of the ghost means and of
    the ghost unbiased variances."""
    x, w, b, rm, rv = _batch(N, S, seed=N + S)
    x = x * 0.03  # per-group variances near eps: eps enters the GN stage
    rm0, rv0 = rm.clone(), rv.clone()
    y = sequential_norm(x, 2, G, rm, rv, w, b, True, factor=0.25, eps=1e-3)
    y_ref, mean, uvar = reference_train(x, 2, G, w, b, 1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * uvar, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("N, G, S", CASES)
def test_training_path_runs_native_kernels_below_the_threshold_and_the_fused_node_above(N, G, S):
    """The GN kernel runs (one native GN call) below :data:`SEQNORM_FUSED_MIN_NUMEL` values or when ``G_M`` does
    not divide ``N``; from exactly that many values on with ``G_M`` dividing ``N`` the fused node runs instead
    (no GN kernel)."""
    x, w, b, rm, rv = _batch(N, S)
    with ComputeOpCounter() as counter:
        sequential_norm(x, 2, G, rm, rv, w, b, True)
    fused = x.numel() >= SEQNORM_FUSED_MIN_NUMEL and N % G == 0
    assert counter.ops["native_group_norm"] == (0 if fused else 1)


def test_eval_is_group_norm_then_batch_norm_with_the_running_statistics():
    """Eval: GN (batch independent), then BN with the running statistics and the affine; buffers unchanged."""
    x, w, b, rm, rv = _batch(3, 6, seed=1)
    rm0, rv0 = rm.clone(), rv.clone()
    y = sequential_norm(x * 0.03, 2, 2, rm, rv, w, b, False, eps=1e-3)
    h = _group_norm(x * 0.03, 2, 1e-3)
    ref = (h - rm.view(1, C, 1)) / torch.sqrt(rv.view(1, C, 1) + 1e-3) * w.view(1, C, 1) + b.view(1, C, 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_training_defaults_are_momentum_0_1_and_eps_1e_5():
    """Without ``factor``/``eps``: ``eps = 1e-5`` (group variances near 1e-4), ``factor = 0.1``."""
    x, w, b, rm, rv = _batch(4, 6, seed=2)
    x = x * 5e-3
    rm0, rv0 = rm.clone(), rv.clone()
    y = sequential_norm(x, 2, 2, rm, rv, w, b, True)
    y_ref, mean, uvar = reference_train(x, 2, 2, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * uvar, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("S", [6, SEQNORM_FUSED_MIN_NUMEL // (4 * C)])
def test_synchronized_ghost_statistics_are_all_reduced_over_the_given_group(S, two_process_world):
    """``sync=True`` (small input, and one at the fused threshold, which still takes the native path): two
    all-reduces (mean, then centred squares) for the ghost stage over ``process_group``, the GN stage local; the
    output is the local definition, the running variance gets the union's count ``2 (N/G_M) S``."""
    group = object()
    x, w, b, rm, rv = _batch(4, S, seed=3)
    x = x * 0.03
    rm0, rv0 = rm.clone(), rv.clone()
    y = sequential_norm(x, 2, 2, rm, rv, w, b, True, factor=0.25, eps=1e-3, sync=True, process_group=group)
    assert two_process_world.groups == [group, group]
    y_ref, mean, uvar = reference_train(x, 2, 2, w, b, 1e-3, copies=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * uvar, rtol=1e-10, atol=1e-12)


def test_statistics_are_local_by_default_in_an_initialized_world(two_process_world):
    """``sync`` defaults to False: no all-reduce even with a process group up; the local count ``(N/G_M) S``."""
    x, w, b, rm, rv = _batch(4, 6, seed=4)
    rv0 = rv.clone()
    sequential_norm(x, 2, 2, rm, rv, w, b, True, factor=0.5, eps=1e-3)
    assert two_process_world.groups == []
    _, _, uvar = reference_train(x, 2, 2, w, b, 1e-3)
    torch.testing.assert_close(rv, 0.5 * rv0 + 0.5 * uvar, rtol=1e-10, atol=1e-12)
