"""Every method at the edges: one position per channel (``(N, C)``, ``(N, C, 1)``,
``(N, C, 1, 1)``) and edge group counts (one group, one group per channel, one group per
element), forward and input gradient against the independent references of
``norm_reference.py``, in float64 and float32.

Regression for BGN with ``num_groups=1`` on ``S = 1`` inputs: its fused backward handed a
stride-0 expanded statistics view to the native batch-norm backward, which read it as dense
memory (garbage gradients that changed from run to run).
"""

from __future__ import annotations

import copy

import norm_reference as R
import pytest
import torch

from normlightning.norms import build_norm

C = 4
N = 6
EDGE_SHAPES = [(N, C), (N, C, 1), (N, C, 1, 1), (N, C, 1, 1, 1)]


def _hn_set(t, spec):
    """(mean, biased var) of one HN set, broadcast to ``t``'s shape (written out per set)."""
    n, c = t.shape[:2]
    name, _, arg = spec.partition(":")
    groups = {"bn": c, "in": c, "ln": 1}.get(name) or int(arg)
    tg = t.reshape(n, groups, c // groups, -1)
    dims = (0, 2, 3) if name in ("bn", "en") else (2, 3)
    m = tg.mean(dim=dims, keepdim=True)
    v = ((tg - m) ** 2).mean(dim=dims, keepdim=True)

    def expand(s):
        return s.expand(s.shape[0], groups, c // groups, tg.shape[3]).reshape(s.shape[0], *t.shape[1:])

    return expand(m), expand(v)


def _brn_first_step(t, r_max=3.0, d_max=5.0):
    """BRN's first training step from fresh running stats (mean 0, var 1): r, d are constants."""
    dims = (0,) + R.spatial_dims(t)
    mu, var = t.mean(dims, keepdim=True), R.bvar(t, dims)
    sigma = torch.sqrt(var + R.EPS)
    with torch.no_grad():
        r = (sigma / (1.0 + R.EPS) ** 0.5).clamp(1 / r_max, r_max)
        d = (mu / (1.0 + R.EPS) ** 0.5).clamp(-d_max, d_max)
    return (t - mu) / sigma * r + d


# (name, build kwargs, reference x -> normalized x before the affine)
CASES = [
    ("bn", {}, lambda t: R.bn_train(t)[0]),
    ("gn", {"num_groups": 1}, lambda t: R.gn_ref(t, 1)),
    ("gn", {"num_groups": 2}, lambda t: R.gn_ref(t, 2)),
    ("ln", {}, lambda t: R.gn_ref(t, 1)),
    ("pn", {}, R.pn_ref),
    ("ghost", {"num_groups": 1}, lambda t: R.ghost_train(t, 1)[0]),
    ("ghost", {"num_groups": 3}, lambda t: R.ghost_train(t, 3)[0]),
    ("seqnorm", {"channel_groups": 1, "batch_groups": 1}, lambda t: R.ghost_train(R.gn_ref(t, 1), 1)[0]),
    ("seqnorm", {"channel_groups": 1, "batch_groups": 2}, lambda t: R.ghost_train(R.gn_ref(t, 1), 2)[0]),
    ("bgn", {"num_groups": 1}, lambda t: R.bgn_train(t, 1)[0]),
    ("bgn", {"num_groups": 2}, lambda t: R.bgn_train(t, 2)[0]),
    ("bgn", {"num_groups": C}, lambda t: R.bgn_train(t, C)[0]),
    ("gbgn", {"channel_groups": 1, "examples_per_group": None}, lambda t: R.gbgn_train(t, 1, N)),
    ("gbgn", {"channel_groups": C, "examples_per_group": 2}, lambda t: R.gbgn_train(t, C, 2)),
    ("gbgn", {"channel_groups": 2, "examples_per_group": 1}, lambda t: R.gbgn_train(t, 2, 1)),
    (
        "hn",
        {"mean": "bn", "std": "en:1"},
        lambda t: (t - _hn_set(t, "bn")[0]) / torch.sqrt(_hn_set(t, "en:1")[1] + R.EPS),
    ),
    (
        "hn",
        {"mean": "bn", "std": f"en:{C}"},
        lambda t: (t - _hn_set(t, "bn")[0]) / torch.sqrt(_hn_set(t, f"en:{C}")[1] + R.EPS),
    ),
    (
        "hn",
        {"mean": "ln", "std": "gn:2"},
        lambda t: (t - _hn_set(t, "ln")[0]) / torch.sqrt(_hn_set(t, "gn:2")[1] + R.EPS),
    ),
    ("sn", {}, None),  # reference needs the layer's mixture weights: see _reference
    ("brn", {"r_max_start_step": 0, "r_max_end_step": 0, "d_max_start_step": 0, "d_max_end_step": 0}, _brn_first_step),
]


def _reference(layer, name, ref, t):
    if name == "sn":
        normalized = R.sn_train(t, layer.mean_weight, layer.var_weight)[0]
    else:
        normalized = ref(t)
    return R.affine(normalized, layer.weight, layer.bias)


@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "name,kwargs,ref",
    CASES,
    ids=[f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items() if 'step' not in k)}" for c in CASES],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("upstream_kind", ["random", "expanded"])
def test_output_and_input_gradient_at_one_position_per_channel(name, kwargs, ref, shape, dtype, upstream_kind):
    """``expanded``: the upstream gradient of ``y.sum()``, a stride-0 view (native backwards
    must not read it as dense memory)."""
    torch.manual_seed(0)
    layer = build_norm(name, C, **kwargs).to(torch.float64).train()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(C, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    upstream = (
        torch.randn(shape, dtype=torch.float64)
        if upstream_kind == "random"
        else torch.ones((), dtype=torch.float64).expand(shape)
    )

    xr = x.clone().requires_grad_(True)
    expected = _reference(layer, name, ref, xr)
    (expected_grad,) = torch.autograd.grad(expected, xr, upstream)

    for _ in range(2):  # twice: garbage read from memory changes from call to call
        ours = copy.deepcopy(layer).to(dtype)  # fresh running statistics (brn's r, d read them)
        xo = x.to(dtype).requires_grad_(True)
        y = ours(xo)
        (grad,) = torch.autograd.grad(y, xo, upstream.to(dtype))
        tol = {"atol": 1e-9, "rtol": 1e-7} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-4}
        torch.testing.assert_close(y.double(), expected.detach(), **tol)
        torch.testing.assert_close(grad.double(), expected_grad, **tol)


@pytest.mark.parametrize("shape", [(N, C), (N, C, 1, 1)], ids=["NC", "NC11"])
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("in", {}),
        ("gn", {"num_groups": C}),
        ("seqnorm", {"channel_groups": C, "batch_groups": 1}),
        ("gbgn", {"channel_groups": C, "examples_per_group": 1}),
        ("hn", {"mean": "bn", "std": "in"}),
        ("bgn", {"num_groups": C}),
    ],
    ids=["in", "gn-G=C", "seqnorm-GC=C", "gbgn-E1-GC=C", "hn-std-in", "bgn-N1"],
)
def test_a_set_of_one_element_is_an_error_not_a_silent_zero(name, kwargs, shape):
    """Sets of one element per statistic in training raise a message that says so."""
    layer = build_norm(name, C, **kwargs).train()
    x = torch.randn(1 if name == "bgn" else N, *shape[1:])
    with pytest.raises(ValueError, match="one element|1 element|more than 1 value|S > 1"):
        layer(x)


def test_bgn_one_group_backward_is_deterministic_and_matches_finite_differences():
    """The original repro: bgn, num_groups=1, (12, 16) features, float64 gradcheck."""
    layer = build_norm("bgn", 16, num_groups=1).double().train()
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)
