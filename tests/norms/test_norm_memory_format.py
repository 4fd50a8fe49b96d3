"""Every method keeps the input's memory format: a channels_last (4-D) or channels_last_3d (5-D)
input gives an output in that format, equal to the output for the same values laid out
contiguously, with equal input and parameter gradients and equal running statistics; a
contiguous input gives a contiguous output.

Regression: ``ghost``, ``seqnorm``, ``brn`` (training), ``gbgn`` (eval) and ``bgn`` with groups
that split channels returned NCHW-contiguous outputs for channels_last inputs, and ``pn``
returned channels_last-strided outputs for contiguous inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from norm_reference import ALL_SPECS

from normlightning.norms import available_norms, build_norm

C = 4
SHAPES = {4: ((6, C, 3, 5), torch.channels_last), 5: ((6, C, 2, 3, 5), torch.channels_last_3d)}
RAMP_NOW = {"r_max_start_step": 0, "r_max_end_step": 0, "d_max_start_step": 0, "d_max_end_step": 0}

# every method (the configurations of norm_reference.ALL_SPECS), then the other code paths:
# the sync (moments) path, uneven ghost batches, BGN's layouts, inference example weighing
CASES = [(name, ALL_SPECS[name], False) for name in sorted(ALL_SPECS)] + [
    ("bn", {"alpha": 0.3}, False),
    ("bn", {}, True),
    ("ghost", {"num_groups": 4, "alpha": 0.3}, False),  # 4 does not divide N = 6
    ("ghost", {"num_groups": 2}, True),
    ("ghost", {"num_groups": 4}, True),
    ("seqnorm", {"channel_groups": 2, "batch_groups": 4}, False),
    ("seqnorm", {"channel_groups": 2, "batch_groups": 2}, True),
    ("bgn", {"num_groups": 1}, False),
    ("bgn", {"num_groups": 2}, False),  # groups of whole channels: channels_last views (N*S, G, C/G)
    ("bgn", {"num_groups": C}, False),  # groups are channels: native kernel on (N, G, D/G)
    ("bgn", {"num_groups": 3 * C}, False),  # groups split channels: the (N, G, D/G) view copies
    ("bgn", {"num_groups": 6}, True),
    ("bgn", {"num_groups": 3 * C}, True),
    ("gbgn", {"channel_groups": 2, "examples_per_group": 4, "alpha": 0.3}, False),
    ("gbgn", {"channel_groups": 2}, False),  # E = N: channels_last views (N*S, G_C, C/G_C)
    ("gbgn", {"channel_groups": 2, "examples_per_group": 2}, False),  # the permuted copy and back
    ("gbgn", {"channel_groups": 2, "examples_per_group": 4}, True),
    ("hn", {"mean": "ln", "std": "gn:2"}, False),
    ("hn", {"mean": "bn", "std": "bn+in+ln"}, True),
    ("sn", {}, True),
    ("brn", RAMP_NOW, True),
]


def _case_id(case) -> str:
    name, kwargs, sync = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items() if k not in RAMP_NOW) + ("-sync" if sync else "")


def test_cases_cover_every_method():
    assert {name for name, _, _ in CASES} == set(available_norms())


def _layer(name: str, kwargs: dict, sync: bool, shape):
    """A layer with random affine, mixture weights and running statistics (one training step on
    a batch of ``shape``)."""
    torch.manual_seed(0)
    layer = build_norm(name, C, **kwargs)
    layer.sync_statistics = sync  # no process group: the moments path on the local batch
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
        layer.train()(torch.randn(shape) * 2 + 1)
    return layer


def _run(layer, x: torch.Tensor, grad: torch.Tensor):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    params = {k: p.grad for k, p in layer.named_parameters()}
    return y, x.grad, params, {k: b.clone() for k, b in layer.named_buffers()}


def _assert_same_run(name: str, got, ref) -> None:
    """Output, input gradient, parameter gradients and buffers of two ``_run`` results are equal."""
    (y, gx, gp, buf), (y_ref, gx_ref, gp_ref, buf_ref) = got, ref
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    for key in gp_ref:
        torch.testing.assert_close(gp[key], gp_ref[key], msg=f"{name}: gradient of {key}")
    for key in buf_ref:
        torch.testing.assert_close(buf[key], buf_ref[key], msg=f"{name}: buffer {key}")


@pytest.mark.parametrize("dim", sorted(SHAPES), ids=lambda d: f"{d}d")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_channels_last_kept_and_equal_to_contiguous(case, training, dim):
    name, kwargs, sync = case
    shape, fmt = SHAPES[dim]
    layer = _layer(name, kwargs, sync, shape).train(training)
    torch.manual_seed(1)
    x = torch.randn(shape) * 3 + 1
    grad = torch.randn(shape)

    y_ref, gx_ref, gp_ref, buf_ref = _run(copy.deepcopy(layer), x.contiguous(), grad)
    y, gx, gp, buf = _run(copy.deepcopy(layer), x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt))

    assert not x.contiguous(memory_format=fmt).is_contiguous()  # the two layouts really differ
    assert y_ref.is_contiguous()
    assert y.is_contiguous(memory_format=fmt), f"{name}: output strides {y.stride()} for shape {tuple(shape)}"
    _assert_same_run(name, (y, gx, gp, buf), (y_ref, gx_ref, gp_ref, buf_ref))


@pytest.mark.parametrize("dim", sorted(SHAPES), ids=lambda d: f"{d}d")
@pytest.mark.parametrize(
    "name,kwargs", [("bgn", {"num_groups": 2}), ("gbgn", {"channel_groups": 2})], ids=["bgn", "gbgn"]
)
def test_channels_last_groups_of_many_channels(name, kwargs, dim):
    """Groups of 8 whole channels (``C = 16``): a channels_last input in training is normalized on the view
    ``(N*S, G, C/G)`` (no copy); output (in the input's format), gradients and buffers equal the
    contiguous input's."""
    shape, fmt = SHAPES[dim]
    shape = (shape[0], 16) + shape[2:]
    torch.manual_seed(0)
    layer = build_norm(name, 16, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    x = torch.randn(shape) * 3 + 1
    grad = torch.randn(shape)
    y_ref, gx_ref, gp_ref, buf_ref = _run(copy.deepcopy(layer), x.contiguous(), grad)
    y, gx, gp, buf = _run(copy.deepcopy(layer), x.contiguous(memory_format=fmt), grad.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt)
    _assert_same_run(name, (y, gx, gp, buf), (y_ref, gx_ref, gp_ref, buf_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_low_precision_channels_last(name, dtype):
    """Cast back to the input's dtype and layout in one step: dtype and format both kept."""
    layer = _layer(name, ALL_SPECS[name], False, SHAPES[4][0])
    x = (torch.randn(SHAPES[4][0]) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        y = layer.train(training)(x)
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last), f"{name}: strides {y.stride()}"


@pytest.mark.parametrize("shape", [(6, C, 15), (6, C, 3, 5), (6, C, 2, 3, 5)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_contiguous_input_gives_contiguous_output(name, shape):
    layer = _layer(name, ALL_SPECS[name], False, shape)
    x = torch.randn(shape)
    for training in (True, False):
        y = layer.train(training)(x)
        assert y.is_contiguous(), f"{name}: output strides {y.stride()} for shape {shape}"


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_one_position_input_keeps_its_exact_strides(name):
    """(N, C, 1, 1) is dense in both formats; the output and the input gradient must still carry
    the input's strides: convolutions pick their layout from them (channel stride 1 reads as
    channels_last), and the convolution next to the layer would convert its weight on every call."""
    spec = {"num_groups": 2} if name in ("bgn", "gnflat") else ALL_SPECS[name]  # G must divide D = C here
    layer = build_norm(name, C, **spec)
    x = torch.randn(6, C, 1, 1) + 1
    for mode in (False,) if name in ("in", "evonorm_b0") else (True, False):  # one value per (instance) set: eval only
        layer.train(mode)
        inp = x.clone().requires_grad_() * 1.0  # not a leaf: its gradient keeps the strides it arrives with
        grads = []
        inp.register_hook(grads.append)
        y = layer(inp)
        y.backward(torch.randn_like(y))
        assert y.stride() == x.stride() and grads[0].stride() == x.stride()
