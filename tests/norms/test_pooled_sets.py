"""The fused pooled-set node (functional/pooled_sets.py) against float64 gradcheck, plan by plan,
and the layers that use it in the modes the per-method tests do not differentiate (eval with
per-example statistics, two stages, block units)."""

from __future__ import annotations

import importlib

import pytest
import torch

from normlightning.norms import (
    BatchGroupNorm,
    GeneralBatchGroupNorm,
    HeterologousNorm,
    SequentialNorm,
    SwitchableNorm,
)
from normlightning.norms.functional.pooled_sets import Const, Own, Pooled, Stage, pooled_set_norm

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

D64 = torch.float64
N, C, S = 4, 6, 5

# name -> (xv shape, affine layout, stages, number of constants, mixture sizes (mean, var))
PLANS = {
    "channels-tv": ((N, C, S), (1, 1), [((Pooled((3, 2), (1,)),), (Pooled((3, 2), (1,)),))], 0, (0, 0)),
    "channels-own-mean": ((N, C, S), (1, 1), [((Own(),), (Pooled((1, C), (1,)),))], 0, (0, 0)),
    "rows-grouped": (
        (1, N * C, S),
        (N, 1),
        [((Pooled((2, 2, 3, 2), (1, 3)),), (Pooled((2, 2, 3, 2), (1, 3)),))],
        0,
        (0, 0),
    ),
    "rows-mixture": (
        (1, N * C, S),
        (N, 1),
        [
            (
                (Own(), Pooled((N, C), (1,)), Pooled((N, C), (0,))),
                (Own(), Pooled((N, C), (1,)), Pooled((N, C), (0,))),
            )
        ],
        0,
        (3, 3),
    ),
    "rows-constants": (
        (1, N * C, S),
        (N, 1),
        [((Own(), Const(0)), (Pooled((N, C), (1,)), Const(1)))],
        2,
        (2, 2),
    ),
    "blocks": ((N, 12, 3), (1, 2), [((Pooled((4, 3), (1,)),), (Pooled((4, 3), (1,)),))], 0, (0, 0)),
    # the variance mixture alone, of sets of different shapes (each part spread to the units)
    "channels-var-mixture": (
        (N, C, S),
        (1, 1),
        [((Own(),), (Own(), Pooled((1, C), (1,)), Pooled((3, 2), (1,))))],
        0,
        (0, 3),
    ),
    # mixtures of 2 and 3 parts: weights concatenated, summed and differentiated apart
    "rows-unequal-mixtures": (
        (1, N * C, S),
        (N, 1),
        [((Own(), Pooled((N, C), (0,))), (Own(), Pooled((N, C), (1,)), Pooled((N, C), (0,))))],
        0,
        (2, 3),
    ),
    # a pooled mean whose sets no variance part pools: m - M of its own
    "channels-pooled-mean-own-var": ((N, C, S), (1, 1), [((Pooled((3, 2), (1,)),), (Own(),))], 0, (0, 0)),
    "two-stages": (
        (1, N * C, S),
        (N, 1),
        [
            ((Pooled((N, 2, 3), (2,)),), (Pooled((N, 2, 3), (2,)),)),
            ((Pooled((2, 2, C), (0,)),), (Pooled((2, 2, C), (0,)),)),
        ],
        0,
        (0, 0),
    ),
    "three-stages": (
        (1, N * C, S),
        (N, 1),
        [
            ((Pooled((N, 2, 3), (2,)),), (Pooled((N, 2, 3), (2,)),)),
            ((Pooled((2, 2, C), (0,)),), (Pooled((2, 2, C), (0,)),)),
            ((Pooled((1, N, C), (1,)),), (Pooled((1, N, C), (1,)),)),
        ],
        0,
        (0, 0),
    ),
}


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_gradcheck(name, affine):
    shape, layout, stages, n_consts, (n_mean, n_var) = PLANS[name]
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=D64) * 2 + 1).requires_grad_()
    w = (torch.rand(C, dtype=D64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=D64, requires_grad=True) if affine else None
    consts = tuple(torch.rand(shape[1], dtype=D64) + 0.5 for _ in range(n_consts))
    ml = torch.randn(n_mean, dtype=D64, requires_grad=True) if n_mean else None
    vl = torch.randn(n_var, dtype=D64, requires_grad=True) if n_var else None

    def fn(x, w, b, ml, vl):
        return pooled_set_norm(x, w, b, layout, stages, 1e-5, consts, mean_logits=ml, var_logits=vl)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b, ml, vl), eps=1e-6, atol=1e-6, fast_mode=True)


def test_outputs_are_the_formula():
    """Two stages on rows: GN over channel pairs, then per-channel statistics over the batch."""
    torch.manual_seed(1)
    x = torch.randn(N, C, S, dtype=D64) * 3 + 2
    pairs, channels = Pooled((N, 3, 2), (2,)), Pooled((1, N, C), (1,))
    stages = [Stage((pairs,), (pairs,)), Stage((channels,), (channels,))]
    y, m, v, stats = pooled_set_norm(x.reshape(1, N * C, S), None, None, (N, 1), stages, 1e-5)
    xg = x.reshape(N, 3, 2 * S)
    h = ((xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, correction=0, keepdim=True) + 1e-5)).reshape(N, C, S)
    ref = (h - h.mean((0, 2), keepdim=True)) / torch.sqrt(h.var((0, 2), correction=0, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.reshape(N, C, S), ref)
    torch.testing.assert_close(m, x.mean(2).flatten())
    torch.testing.assert_close(v, x.var(2, correction=0).flatten())
    assert [len(stage.means) + len(stage.variances) for stage in stats] == [2, 2]
    torch.testing.assert_close(stats[1].means[0].flatten(), h.mean((0, 2)))
    torch.testing.assert_close(stats[1].variances[0].flatten(), h.var((0, 2), correction=0))


@pytest.mark.parametrize(
    "make,train",
    [
        (lambda: SwitchableNorm(3, dtype=D64), False),
        (lambda: HeterologousNorm(4, mean="bn", std="bn+in", dtype=D64), False),
        (lambda: HeterologousNorm(4, mean="in", std="gn:2", dtype=D64), True),
        (lambda: GeneralBatchGroupNorm(4, channel_groups=2, examples_per_group=2, dtype=D64), True),
        (lambda: GeneralBatchGroupNorm(4, channel_groups=2, dtype=D64), True),
        (lambda: BatchGroupNorm(4, num_groups=2, dtype=D64), True),
        (lambda: BatchGroupNorm(4, num_groups=6, dtype=D64), True),
        (lambda: SequentialNorm(4, channel_groups=2, batch_groups=2, dtype=D64), True),
    ],
    ids=[
        "sn-eval",
        "hn-mixture-eval",
        "hn-rows",
        "gbgn-rows",
        "gbgn-channels",
        "bgn-channels",
        "bgn-blocks",
        "seqnorm",
    ],
)
def test_layer_gradcheck(make, train, monkeypatch):
    monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0)  # the fused path at any size
    torch.manual_seed(2)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() and p.shape[0] == layer.num_features else 0.0))
    layer(torch.randn(4, layer.num_features, 3, 2, dtype=D64) + 1)  # running statistics away from their init
    layer.train(train)
    x = (torch.randn(4, layer.num_features, 3, 2, dtype=D64) * 2 + 1).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    buffers = dict(layer.named_buffers())

    def fn(inp, *ps):
        state = {**dict(zip(names, ps)), **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(layer, state, (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()), eps=1e-6, atol=1e-5)
