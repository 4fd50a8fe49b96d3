"""The statistics helpers of ``normlightning.norms.functional.moments`` against float64 references written out
here (issue 27, its mutation survivors):

- ``pooled_moments``: the mean and biased variance of the union of equal-size sets, from the sets' own moments,
  equal to ``torch.mean`` / ``torch.var(unbiased=False)`` of the raw values of the union;
- synchronized ``reduce_mean`` / ``pooled_moments``: a world of two processes simulated by a recorded all-reduce
  (``SUM``) that adds the payload of a second process holding *different* data: what is sent (the local sums and
  the count), over which group, how often, and that the results are the statistics of the union across both
  processes; without ``sync`` nothing is all-reduced in an initialized world;
- the all-reduce's deprecation ``FutureWarning`` is silenced, other warnings reach the caller;
- ``update_running_stats``: batch values of another dtype than the running buffers are cast to the buffers' dtype
  (and reshaped to their shape) before PyTorch's update ``r <- (1 - f) r + f b``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.nn.functional as dist_nn_functional

from normlightning.norms.functional.moments import pooled_moments, reduce_mean, update_running_stats

F64 = torch.float64
SUM = torch.distributed.ReduceOp.SUM if torch.distributed.is_available() else None


def _sets(shape, S: int, *, seed: int):
    """Raw values ``(*shape, S)`` (one set of ``S`` values per leading index) and the sets' mean and biased
    variance, ``(*shape, 1)``, written out (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, S, generator=g, dtype=F64) * 1.5 + torch.randn(*shape, 1, generator=g, dtype=F64)
    mean = x.sum(-1, keepdim=True) / S
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / S
    return x, mean, var


@pytest.mark.parametrize("dims", [(1,), (0, 1), (0, 2)])
def test_pooled_moments_are_the_moments_of_the_union_of_the_sets(dims):
    """Locally: the pooled mean / biased variance over ``dims`` are those of all raw values of the pooled sets
    (law of total variance), and the count is the number of sets pooled."""
    x, mean, var = _sets((2, 3, 4), 5, seed=1)
    mu, pooled, count = pooled_moments(mean, var, dims, sync=False)
    raw_dims = tuple(dims) + (3,)
    torch.testing.assert_close(mu, x.mean(raw_dims, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled, x.var(raw_dims, unbiased=False, keepdim=True), rtol=1e-12, atol=1e-12)
    expected_count = 1
    for d in dims:
        expected_count *= mean.shape[d]
    assert count == expected_count


class _PeerWorld:
    """An initialized world of two processes: each all-reduce returns the local payload plus the next payload of
    the other process (``peer``, in call order). Records the op, the group and the payload sent."""

    def __init__(self, monkeypatch, peer, *, warn: bool = False):
        self.peer = list(peer)
        self.calls = []
        self.warn = warn
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(dist_nn_functional, "all_reduce", self._all_reduce)

    def _all_reduce(self, tensor, op=SUM, group=None):
        if self.warn:
            # as torch.distributed.nn.functional.all_reduce does, and some other warning of the collective
            warnings.warn("torch.distributed.nn.functional.all_reduce is deprecated", FutureWarning, stacklevel=2)
            warnings.warn("all_reduce: some backend notice", UserWarning, stacklevel=2)
        self.calls.append((op, group, tensor.detach().clone()))
        return tensor + self.peer[len(self.calls) - 1]


@pytest.fixture
def peer_world(monkeypatch):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    return lambda peer, **kw: _PeerWorld(monkeypatch, peer, **kw)


def test_synchronized_means_are_those_of_the_union_across_the_processes(peer_world):
    """``reduce_mean(sync=True)``: one all-reduce (``SUM``, over ``process_group``) of the local sums of each
    tensor over ``dims`` and the local count; the means are over the union of both processes' values (the other
    process holds another number of values), the count is the total (a 0-d tensor)."""
    g = torch.Generator().manual_seed(2)
    a1, a2 = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g, dtype=F64) + 3
    b1, b2 = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, generator=g, dtype=F64) - 1
    dims = (0, 2)
    peer = torch.cat([b1.sum(dims).reshape(-1), b2.sum(dims).reshape(-1), torch.tensor([20.0], dtype=F64)])
    world = peer_world([peer])
    group = object()
    (m1, m2), count = reduce_mean([a1, a2], dims, sync=True, process_group=group)
    sent = torch.cat([a1.sum(dims), a2.sum(dims), torch.tensor([8.0], dtype=F64)])
    assert len(world.calls) == 1
    op, got_group, payload = world.calls[0]
    assert op == SUM and got_group is group
    torch.testing.assert_close(payload, sent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m1, torch.cat([a1, b1]).mean(dims, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m2, torch.cat([a2, b2]).mean(dims, keepdim=True), rtol=1e-12, atol=1e-12)
    assert m1.shape == (1, 3, 1)
    assert isinstance(count, torch.Tensor) and count.dim() == 0 and count.item() == 28


def test_means_are_local_by_default_in_an_initialized_world(peer_world):
    """Without ``sync``: no all-reduce, the local means and an int count."""
    world = peer_world([])
    x = torch.randn(2, 3, 4, dtype=F64)
    (m,), count = reduce_mean([x], (0, 2))
    assert world.calls == []
    torch.testing.assert_close(m, x.mean((0, 2), keepdim=True), rtol=1e-12, atol=1e-12)
    assert count == 8 and isinstance(count, int)


def test_only_the_deprecation_warning_of_the_all_reduce_is_silenced(peer_world):
    """The all-reduce's deprecation ``FutureWarning`` does not reach the caller; any other warning does."""
    peer_world([torch.zeros(4, dtype=F64)], warn=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reduce_mean([torch.ones(2, 3, dtype=F64)], (0,), sync=True)
    assert [w.category for w in caught] == [UserWarning]
    assert "some backend notice" in str(caught[0].message)


def test_synchronized_pooled_moments_are_those_of_the_union_across_the_processes(peer_world):
    """``pooled_moments(sync=True)``: two all-reduces over ``process_group``, of ``(sum m, count)`` then of
    ``(sum (v + (m - M)^2), count)`` with ``M`` the mean across both processes; the results are the mean and
    biased variance of all raw values of the pooled sets of both processes, and the total number of sets."""
    xa, ma, va = _sets((2, 3), 4, seed=3)
    xb, mb, vb = _sets((2, 3), 4, seed=4)
    xb = xb * 2 + 5  # the other process's sets differ in mean and in spread
    mb, vb = mb * 2 + 5, vb * 4
    dims = (1,)
    union = torch.cat([xa, xb], dim=1)  # (2, 6, 4): the pooled sets of both processes
    M = union.mean((1, 2), keepdim=True)
    V = union.var((1, 2), unbiased=False, keepdim=True)
    three = torch.tensor([3.0], dtype=F64)
    peer = [
        torch.cat([mb.sum(dims).reshape(-1), three]),
        torch.cat([(vb + (mb - M) ** 2).sum(dims).reshape(-1), three]),
    ]
    world = peer_world(peer)
    group = object()
    mu, pooled, count = pooled_moments(ma, va, dims, sync=True, process_group=group)
    assert [(op, g) for op, g, _ in world.calls] == [(SUM, group), (SUM, group)]
    sent = [
        torch.cat([ma.sum(dims).reshape(-1), three]),
        torch.cat([(va + (ma - M) ** 2).sum(dims).reshape(-1), three]),
    ]
    for (_, _, payload), expected in zip(world.calls, sent):
        torch.testing.assert_close(payload, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mu, M, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled, V, rtol=1e-12, atol=1e-12)
    assert count.item() == 6


@pytest.mark.parametrize("buffer_dtype, batch_dtype", [(torch.float32, F64), (torch.bfloat16, torch.float32)])
def test_running_stats_take_batch_values_of_another_dtype_and_shape(buffer_dtype, batch_dtype):
    """Batch statistics of another dtype (and shape ``(1, C, 1)``) than the running buffers ``(C,)``: the buffers
    keep their dtype and get ``(1 - f) r + f b`` (the variance unbiased, ``n / (n - 1)``), ``b`` rounded to the
    buffers' dtype."""
    g = torch.Generator().manual_seed(5)
    rm64, rv64 = torch.randn(3, generator=g, dtype=F64), torch.rand(3, generator=g, dtype=F64) + 0.5
    mean64, var64 = torch.randn(1, 3, 1, generator=g, dtype=F64), torch.rand(1, 3, 1, generator=g, dtype=F64) + 0.5
    rm, rv = rm64.to(buffer_dtype), rv64.to(buffer_dtype)
    rm0, rv0 = rm.to(F64), rv.to(F64)
    update_running_stats(rm, rv, mean64.to(batch_dtype), var64.to(batch_dtype), 4, 0.25)
    assert rm.dtype == buffer_dtype and rv.dtype == buffer_dtype
    tol = {"rtol": 1e-2, "atol": 1e-2} if buffer_dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(rm.to(F64), 0.75 * rm0 + 0.25 * mean64.view(3), **tol)
    torch.testing.assert_close(rv.to(F64), 0.75 * rv0 + 0.25 * var64.view(3) * 4 / 3, **tol)
