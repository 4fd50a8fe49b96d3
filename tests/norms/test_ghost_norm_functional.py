"""GhostNorm's functional form (``normlightning.norms.functional.ghost_norm``, docs/methods.md, section ghost)
against independent references (issue 27, its mutation survivors):

- training output: ``torch.nn.functional.batch_norm`` of each ghost batch (the samples ``n = j (mod G_M)``),
  put back in place; the running statistics by PyTorch's update ``r <- (1 - f) r + f b`` written out, ``b``
  the mean over ghost batches of their means / unbiased variances (``torch.mean`` / ``torch.var``, float64);
- eval: ``torch.nn.functional.batch_norm`` with the running statistics;
- synchronized statistics: a world of two processes simulated by a recorded all-reduce that adds a second
  process holding the same batch, so each ghost set is the union of two copies of the local one (same mean
  and biased variance, twice the count: the running variance's ``n / (n - 1)`` factor shows the count);
- the native calls and the float32 shift counted by ``ComputeOpCounter``; the devices of the tensors created on
  a meta input; the running buffers' dtype; the set-size error message.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from normlightning.norms.functional import ghost_norm
from normlightning.norms.op_count import ComputeOpCounter

F64 = torch.float64
C = 3


def _batch(N: int, *, seed: int = 0, device: str = "cpu"):
    """``x (N, C, 2, 2)``, running mean / var and an affine with no entry equal to 0 or 1 (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, 2, 2, generator=g, dtype=F64) * 2 + 0.5
    running_mean = torch.randn(C, generator=g, dtype=F64)
    running_var = torch.rand(C, generator=g, dtype=F64) + 0.5
    weight = torch.rand(C, generator=g, dtype=F64) + 1.5
    bias = torch.rand(C, generator=g, dtype=F64) + 0.5
    return [t.to(device) for t in (x, running_mean, running_var, weight, bias)]


def _ghost_reference(x, G, weight, bias, eps, copies: int = 1):
    """Ghost batch ``j`` = samples ``j::G``, each normalized by ``F.batch_norm`` over the union of ``copies``
    identical copies of it (the processes of a synchronized world holding the same data); returns the output
    and the mean over ghost batches of their means and unbiased variances (per channel)."""
    y = torch.empty_like(x)
    means, uvars = [], []
    for j in range(G):
        union = torch.cat([x[j::G]] * copies)
        y[j::G] = F.batch_norm(union, None, None, weight, bias, training=True, eps=eps)[: x[j::G].shape[0]]
        means.append(union.mean(dim=(0, 2, 3)))
        uvars.append(union.var(dim=(0, 2, 3), unbiased=True))
    return y, torch.stack(means).mean(0), torch.stack(uvars).mean(0)


# (N, G_M): one ghost batch (BN's native path), G_M dividing N (one native call), G_M not dividing N
SPLITS = [(4, 1), (6, 2), (5, 2)]


@pytest.mark.parametrize("N, G", SPLITS)
def test_training_defaults_are_momentum_0_1_and_eps_1e_5(N, G):
    """Without ``factor``/``eps``: PyTorch's BatchNorm defaults (momentum 0.1, eps 1e-5), weight and bias applied."""
    x, rm, rv, w, b = _batch(N)
    rm0, rv0 = rm.clone(), rv.clone()
    y = ghost_norm(x, G, rm, rv, w, b, training=True)
    y_ref, mean, uvar = _ghost_reference(x, G, w, b, eps=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * uvar, rtol=1e-12, atol=1e-12)


def test_eval_normalizes_with_the_running_statistics_and_the_given_eps():
    x, rm, rv, w, b = _batch(4)
    rm0, rv0 = rm.clone(), rv.clone()
    y = ghost_norm(x, 2, rm, rv, w, b, training=False, eps=0.5)
    torch.testing.assert_close(y, F.batch_norm(x, rm0, rv0, w, b, training=False, eps=0.5), rtol=1e-12, atol=1e-12)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("N, G, native_calls", [(6, 2, 1), (6, 3, 1), (5, 2, 2)])
def test_ghost_batches_of_a_divisible_batch_come_from_one_native_call(N, G, native_calls):
    """G_M dividing N: one native batch norm on the view (N/G_M, G_M*C, S) (the docstring's fast path);
    otherwise one per ghost batch."""
    x, rm, rv, w, b = _batch(N)
    with ComputeOpCounter() as counter:
        ghost_norm(x, G, rm, rv, w, b, training=True)
    assert counter.ops["native_batch_norm"] == native_calls


@pytest.mark.parametrize("dtype, shifts", [(torch.float64, 0), (torch.float32, 1)])
def test_only_sets_of_one_example_below_float64_are_shifted(dtype, shifts):
    """Ghost sets of one example (N = G_M) get the input shifted by its first value (one subtraction, added
    back to the means) below float64 only (docs/methods.md, "Precision"); float64 input goes to the kernel as is."""
    x, rm, rv, w, b = (t.to(dtype) for t in _batch(3))
    with ComputeOpCounter() as counter:
        ghost_norm(x, 3, rm, rv, w, b, training=True)
    assert (counter.ops["native_batch_norm"], counter.ops["sub"]) == (1, shifts)


class _CreatedTensorDevices(TorchDispatchMode):
    """The devices of every tensor an op returns while active (allocations included)."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
        return out


@pytest.mark.parametrize("N, G", SPLITS)
def test_every_tensor_is_created_on_the_input_device(N, G):
    """On the meta device (standing in for an accelerator): the statistics buffers and the uneven split's
    index tensors are allocated on the input's device, none on the CPU."""
    x, rm, rv, w, b = _batch(N, device="meta")
    with _CreatedTensorDevices() as created:
        y = ghost_norm(x, G, rm, rv, w, b, training=True)
    assert created.devices == {"meta"}
    assert (y.device.type, y.shape) == ("meta", x.shape)


def test_running_statistics_keep_their_dtype_below_the_compute_dtype():
    """bfloat16 input and buffers (a layer moved to bfloat16): statistics computed in float32 (docs/methods.md,
    "Precision"), the buffers updated in bfloat16 by ``r <- 0.9 r + 0.1 b``."""
    x, rm, rv, w, b = (t.to(torch.bfloat16) for t in _batch(6))
    rm0, rv0 = rm.double(), rv.double()
    ghost_norm(x, 2, rm, rv, w, b, training=True)
    _, mean, uvar = _ghost_reference(x.double(), 2, w.double(), b.double(), eps=1e-5)
    assert (rm.dtype, rv.dtype) == (torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(rm.double(), 0.9 * rm0 + 0.1 * mean, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rv.double(), 0.9 * rv0 + 0.1 * uvar, rtol=1e-2, atol=1e-2)


def test_ghost_sets_of_one_element_are_refused_naming_the_settings():
    """N = 3 examples in G_M = 2 ghost batches of (N, C) features: the smaller ghost set holds N // G_M = 1 value."""
    x, rm, rv, w, b = _batch(3)
    message = (
        "GhostNorm with N=3, G_M=2, S=1 has 1 element(s) per normalization set; a set needs more than 1 value "
        "(its variance is undefined). Use fewer ghost batches (num_groups) or larger ghost batches (ghost_batch_size)."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ghost_norm(x[:, :, 0, 0], 2, rm, rv, w, b, training=True)


@pytest.mark.parametrize("N, G", SPLITS)
def test_synchronized_statistics_are_all_reduced_over_the_given_group(N, G, two_process_world):
    """``sync=True``: two all-reduces (mean, then centred squares) per ghost pass over ``process_group``;
    the output and the running statistics are those of each ghost set's union across the two processes."""
    group = object()
    x, rm, rv, w, b = _batch(N)
    rm0, rv0 = rm.clone(), rv.clone()
    y = ghost_norm(x, G, rm, rv, w, b, training=True, factor=0.25, eps=1e-3, sync=True, process_group=group)
    passes = 1 if N % G == 0 else G
    assert two_process_world.groups == [group] * (2 * passes)
    y_ref, mean, uvar = _ghost_reference(x, G, w, b, eps=1e-3, copies=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rm, 0.75 * rm0 + 0.25 * mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, 0.75 * rv0 + 0.25 * uvar, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N, G", SPLITS)
def test_statistics_are_local_by_default_in_an_initialized_world(N, G, two_process_world):
    """Without ``sync``: no all-reduce, the process's own ghost statistics (count N/G_M * S, not twice it)."""
    x, rm, rv, w, b = _batch(N)
    rv0 = rv.clone()
    ghost_norm(x, G, rm, rv, w, b, training=True)
    assert two_process_world.groups == []
    _, _, uvar = _ghost_reference(x, G, w, b, eps=1e-5)
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * uvar, rtol=1e-12, atol=1e-12)
