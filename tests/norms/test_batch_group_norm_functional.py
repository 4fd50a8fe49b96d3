"""``batch_group_norm`` (norms/functional/batch_group_norm.py) against the definition written out here.

BGN flattens ``(C, S)`` to ``D = C*S`` and cuts ``D`` into ``G`` contiguous groups of ``D/G``: per group,
the mean ``mu_g`` and biased variance ``var_g`` over ``(N, D/G)``; ``y = gamma_c (x - mu_g) / sqrt(var_g + eps)
+ beta_c`` with ``c`` the channel of the element; running statistics ``r <- (1-f) r + f b`` with the unbiased
variance ``var_g * n / (n - 1)``, ``n = N*D/G`` (docs/methods.md, section bgn). Float64 throughout.
"""

from __future__ import annotations

import re

import pytest
import torch

from normlightning.norms import build_norm
from normlightning.norms.functional.batch_group_norm import batch_group_norm


def reference(x, G, weight, bias, eps, mean=None, var=None):
    """The formula, from set statistics ``mean``/``var`` ``(G,)`` (batch statistics when ``None``)."""
    N, C = x.shape[:2]
    xv = x.reshape(N, G, -1)
    if mean is None:
        mean, var = xv.mean(dim=(0, 2)), xv.var(dim=(0, 2), unbiased=False)
    y = ((xv - mean.view(1, G, 1)) / torch.sqrt(var.view(1, G, 1) + eps)).reshape(N, C, -1)
    if weight is not None:
        y = y * weight.view(1, C, 1)
    if bias is not None:
        y = y + bias.view(1, C, 1)
    return y.reshape(x.shape)


def inputs(shape, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    C = shape[1]
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    rm = torch.randn(G, generator=g, dtype=torch.float64)
    rv = torch.rand(G, generator=g, dtype=torch.float64) + 0.5
    return x, w, b, rm, rv


# (shape, G): groups split channels (C=3, S=4, G=4: blocks of 1 value, 4 per channel), groups span
# channels (C=4, G=2), channel blocks of 2 inside groups of 4 (C=2, S=6, G=3), G a multiple of C (G=2C).
CASES = [((3, 3, 2, 2), 4), ((3, 4, 2, 2), 2), ((4, 2, 6), 3), ((3, 2, 2, 2), 4)]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize(("shape", "G"), CASES)
def test_training_output_and_running_stats_match_formula(shape, G, sync, affine):
    x, w, b, rm, rv = inputs(shape, G)
    w, b = (w, b) if affine else (None, None)
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_group_norm(x, G, rm, rv, w, b, training=True, factor=0.3, eps=1e-3, sync=sync)
    torch.testing.assert_close(y, reference(x, G, w, b, 1e-3), rtol=1e-10, atol=1e-10)
    xv = x.reshape(shape[0], G, -1)
    n = xv.shape[0] * xv.shape[2]
    torch.testing.assert_close(rm, 0.7 * rm0 + 0.3 * xv.mean(dim=(0, 2)))
    torch.testing.assert_close(rv, 0.7 * rv0 + 0.3 * xv.var(dim=(0, 2), unbiased=False) * n / (n - 1))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "G"), CASES)
def test_eval_uses_running_stats_and_leaves_them(shape, G, affine):
    x, w, b, rm, rv = inputs(shape, G, seed=1)
    w, b = (w, b) if affine else (None, None)
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_group_norm(x, G, rm, rv, w, b, training=False, factor=0.3, eps=1e-3)
    torch.testing.assert_close(y, reference(x, G, w, b, 1e-3, rm0, rv0), rtol=1e-10, atol=1e-10)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_defaults_are_factor_0_1_and_eps_1e_5():
    shape, G = (3, 3, 2, 2), 4
    x, w, b, rm, rv = inputs(shape, G, seed=2)
    x = x * 1e-2  # variance ~1e-3: eps = 1e-5 vs any other value shows in the output
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_group_norm(x, G, rm, rv, w, b, training=True)
    torch.testing.assert_close(y, reference(x, G, w, b, 1e-5), rtol=1e-10, atol=1e-10)
    xv = x.reshape(shape[0], G, -1)
    n = xv.shape[0] * xv.shape[2]
    torch.testing.assert_close(rm, 0.9 * rm0 + 0.1 * xv.mean(dim=(0, 2)))
    torch.testing.assert_close(rv, 0.9 * rv0 + 0.1 * xv.var(dim=(0, 2), unbiased=False) * n / (n - 1))


@pytest.mark.parametrize(
    ("shape", "G", "names", "dims", "D", "near"),
    [
        ((2, 3, 5), 4, "C·L", "3·5", 15, "[1, 3, 5, 15]"),
        ((2, 3, 1, 5), 4, "C·H·W", "3·1·5", 15, "[1, 3, 5, 15]"),
        ((2, 3, 1, 5, 1), 4, "C·D·H·W", "3·1·5·1", 15, "[1, 3, 5, 15]"),
        ((2, 6), 4, "C", "6", 6, "[1, 2, 3, 6]"),
    ],
)
def test_groups_not_dividing_D_name_the_dims(shape, G, names, dims, D, near):
    x = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        batch_group_norm(x, G, torch.zeros(G), torch.ones(G), None, None, training=True)
    assert str(info.value) == (
        f"BatchGroupNorm num_groups={G} must divide D = {names} = {dims} = {D}; "
        f"valid choices (divisors of {D}) near {G}: {near}."
    )


def test_set_of_one_value_is_refused_in_training():
    x = torch.zeros(1, 2, 2, dtype=torch.float64)
    msg = (
        "BatchGroupNorm with N=1, D/G=1 has 1 element(s) per normalization set; a set needs more than 1 value "
        "(its variance is undefined). Use a larger batch or fewer groups."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        batch_group_norm(x, 4, torch.zeros(4), torch.ones(4), None, None, training=True)


@pytest.mark.parametrize(("shape", "G"), CASES[:3])
def test_eval_float32_running_stats_on_float64_input(shape, G):
    """Buffers kept in float32 (a ``.double()``-ed input), G not a multiple of C: the output is float64
    from the float32 values. (G a multiple of C raises a dtype mismatch in the native kernel today.)"""
    x, w, b, rm, rv = inputs(shape, G, seed=3)
    rm, rv = rm.float(), rv.float()
    y = batch_group_norm(x, G, rm, rv, w, b, training=False, eps=1e-3)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference(x, G, w, b, 1e-3, rm.double(), rv.double()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("shape", "G"), CASES)
def test_sync_all_reduces_over_the_given_group_and_default_is_local(shape, G, two_process_world):
    x, w, b, rm, rv = inputs(shape, G, seed=4)
    batch_group_norm(x, G, rm.clone(), rv.clone(), w, b, training=True)
    assert two_process_world.groups == []  # sync defaults to False: no all-reduce even with a process group up
    group = object()
    y = batch_group_norm(x, G, rm, rv, w, b, training=True, eps=1e-3, sync=True, process_group=group)
    assert two_process_world.groups and all(g is group for g in two_process_world.groups)
    torch.testing.assert_close(y, reference(x, G, w, b, 1e-3), rtol=1e-10, atol=1e-10)


def test_float32_layer_with_groups_inside_channels_takes_float64_input_in_eval():
    """``G`` a multiple of ``C`` (each group inside one channel): eval of a float32 layer on float64 input reads its
    float32 running statistics in float64, as the other group layouts and ``bn``'s eval do (it raised before)."""
    layer = build_norm("bgn", 4, num_groups=8)
    layer(torch.randn(4, 4, 4, 4))
    layer.eval()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    mean, var = (t.double().view(1, 8, 1) for t in (layer.running_mean, layer.running_var))
    expected = ((x.view(2, 8, 8) - mean) / torch.sqrt(var + layer.eps)).view(2, 4, 4, 4)
    expected = expected * layer.weight.double().view(1, 4, 1, 1) + layer.bias.double().view(1, 4, 1, 1)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
