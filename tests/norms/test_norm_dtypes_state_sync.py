"""Mixed precision, clamped variances, state_dict round trips, and the synchronized-statistics
(moments) path against the native fast path."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from norm_reference import ALL_SPECS, WEIGHING, sync_bn_worker

from normlightning.norms import BatchNorm, GeneralBatchGroupNorm, SwitchableNorm, build_norm

NAMES = sorted(ALL_SPECS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_input(name, dtype):
    """Output in the input's dtype; statistics in float32 (= the float32 computation on the
    same rounded input, up to the output rounding)."""
    torch.manual_seed(0)
    a, b = build_norm(name, 4, **ALL_SPECS[name]), build_norm(name, 4, **ALL_SPECS[name])
    x = (torch.randn(4, 4, 3, 3) * 3 + 2).to(dtype)
    for mode in (True, False):
        a.train(mode), b.train(mode)
        y = a(x)
        assert y.dtype == dtype
        ref = b(x.float())
        torch.testing.assert_close(y.float(), ref, atol=0.02 if dtype == torch.float16 else 0.08, rtol=0.02)
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            torch.testing.assert_close(v, b.state_dict()[k])


@pytest.mark.parametrize(
    "layer",
    [
        lambda: GeneralBatchGroupNorm(4, channel_groups=1),
        lambda: SwitchableNorm(4),
        lambda: BatchNorm(4, alpha=0.5),
    ],
    ids=["gbgn", "sn", "bn-alpha"],
)
def test_moment_variances_clamped_at_zero(layer):
    """A constant large input makes E[x^2] - E[x]^2 round below zero in float32 (by far more
    than eps): without the clamp this gives NaN."""
    m = layer()
    x = torch.full((4, 4, 3, 3), 3001.7)
    x3 = x.reshape(4, 4, -1)
    assert float((x3 * x3).mean() - x3.mean() ** 2) != 0.0  # rounding really happens here
    if isinstance(m, BatchNorm):
        m.eval()
        m.running_mean.fill_(3001.7)
        m.running_var.zero_()
    out = m(x)
    assert torch.isfinite(out).all()
    m.eval()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(1)
    a = build_norm(name, 4, **ALL_SPECS[name])
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(2):
        a(torch.randn(4, 4, 3, 3))
    path = tmp_path / "norm.pt"
    torch.save(a.state_dict(), path)
    b = build_norm(name, 4, **ALL_SPECS[name])
    b.load_state_dict(torch.load(path))
    a.eval(), b.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(a(x), b(x))
    if a.uses_batch_statistics:
        assert int(b.num_batches_tracked) == 2
        b.reset_running_stats()
        assert int(b.num_batches_tracked) == 0


@pytest.mark.parametrize("name", [n for n in NAMES if build_norm(n, 4, **ALL_SPECS[n]).uses_batch_statistics])
def test_sync_moments_path_matches_fast_path(name):
    """``sync_statistics=True`` without an initialized process group runs the moments path
    locally (a world of one): same outputs, gradients and running statistics as the fast path."""
    torch.manual_seed(2)
    a = build_norm(name, 4, **ALL_SPECS[name]).double()
    b = build_norm(name, 4, **ALL_SPECS[name]).double()
    b.load_state_dict(a.state_dict())
    b.sync_statistics = True
    for step in range(2):
        x = torch.randn(6, 4, 3, 2, dtype=torch.float64) * 2 + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = a(xa), b(xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        torch.testing.assert_close(torch.autograd.grad(ya, xa, g)[0], torch.autograd.grad(yb, xb, g)[0])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_sync_two_processes_gloo(tmp_path):
    """Two CPU processes (gloo), each with half the batch, synced = BN on the whole batch
    (forward, input gradient and running statistics)."""
    torch.manual_seed(3)
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    mp.spawn(sync_bn_worker, args=(2, str(tmp_path / "init"), x, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    ref = torch.nn.BatchNorm1d(3).double()
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    w = torch.cat([torch.arange(yr.numel() // 2, dtype=yr.dtype).view(4, 3, 4)] * 2)
    (yr * w).sum().backward()
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), yr.detach())
    torch.testing.assert_close(torch.cat([p["g"] for p in parts]), xr.grad)
    for p in parts:
        torch.testing.assert_close(p["rm"], ref.running_mean)
        torch.testing.assert_close(p["rv"], ref.running_var)


def test_the_example_weighing_methods():
    assert set(WEIGHING) >= {"bn", "ghost", "gbgn"}  # the methods of docs/methods.md, "Inference example weighing"


@pytest.mark.parametrize("name", WEIGHING)
def test_alpha_persists_in_state_dict(name, tmp_path):
    """``alpha`` is the 0-d float32 buffer ``example_weighing_alpha``: a state_dict round trip
    (through a file, as a checkpoint) into a fresh layer gives the same alpha and eval output."""
    torch.manual_seed(4)
    a = build_norm(name, 4, **ALL_SPECS[name])
    for _ in range(3):
        a(torch.randn(4, 4, 3, 3) * 2 + 1)
    a.alpha = 0.3
    sd = a.state_dict()
    assert sd["example_weighing_alpha"].shape == () and sd["example_weighing_alpha"].dtype == torch.float32
    assert float(sd["example_weighing_alpha"]) == pytest.approx(0.3)
    torch.save(sd, tmp_path / "w.pt")
    b = build_norm(name, 4, **ALL_SPECS[name])
    assert b.alpha == 0.0
    b.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert isinstance(b.alpha, float) and b.alpha == pytest.approx(0.3)
    a.eval(), b.eval()
    x = torch.randn(2, 4, 3, 3) * 2 + 1
    torch.testing.assert_close(b(x), a(x))
    plain = build_norm(name, 4, **ALL_SPECS[name])
    plain.load_state_dict({k: v for k, v in sd.items() if k != "example_weighing_alpha"}, strict=False)
    plain.eval()
    assert not torch.allclose(plain(x), a(x))  # alpha really changes the eval output


def test_alpha_state_dict_edge_cases():
    """An older state_dict without the key keeps the current alpha (strict loading works);
    an out-of-range stored alpha is a load error naming alpha; the property validates."""
    a = BatchNorm(4)
    old = {k: v for k, v in a.state_dict().items() if k != "example_weighing_alpha"}
    b = BatchNorm(4, alpha=0.25)
    b.load_state_dict(old)  # strict
    assert b.alpha == 0.25 and float(b.example_weighing_alpha) == 0.25
    bad = dict(a.state_dict(), example_weighing_alpha=torch.tensor(1.5))
    with pytest.raises(RuntimeError, match="alpha must be a float in \\[0, 1\\]"):
        b.load_state_dict(bad)
    assert b.alpha == 0.25
    with pytest.raises(ValueError, match="alpha"):
        b.alpha = -0.1
    b.alpha = 1
    assert b.alpha == 1.0 and float(b.example_weighing_alpha) == 1.0


# Running-statistic buffers of each layer, written out (num_batches_tracked and non-statistic
# buffers such as brn's renorm_step, bgn's trained_spatial_numel and alpha's are excluded).
RUNNING_STATS = {
    "bn": ("running_mean", "running_var"),
    "ghost": ("running_mean", "running_var"),
    "seqnorm": ("running_mean", "running_var"),
    "bgn": ("running_mean", "running_var"),
    "gbgn": ("moving_x", "moving_x2"),
    "hn": ("running_mean", "running_var_0", "running_var_1"),
    "sn": ("running_mean", "running_var"),
    "brn": ("running_mean", "running_var"),
    "evonorm_b0": ("running_var",),
    "mabn": ("running_x2",),  # its windows moving_x2 / moving_gz are training state
    "cbn": ("running_mean", "running_var"),
}


@pytest.mark.parametrize("name", NAMES)
def test_running_stat_names(name):
    layer = build_norm(name, 4, **ALL_SPECS[name])
    if not layer.uses_batch_statistics:
        assert name not in RUNNING_STATS and not hasattr(layer, "running_stat_names")
        return
    # a method not listed above (a new one, a plugin): its declared names, checked below and by check_norm_layer
    assert layer.running_stat_names == RUNNING_STATS.get(name, layer.running_stat_names)
    buffers = dict(layer.named_buffers())
    assert set(layer.running_stat_names) <= set(buffers)
    # every other floating buffer is not a statistic of the data (alpha), training state that is not an average of
    # per-batch statistics (mabn's windows of past iterations), a constant of the configuration that is not saved
    # (brn's ramp table) or an integer counter
    training_state = {"mabn": {"moving_x2", "moving_gz"}}.get(name, set())
    constants = {"brn": {"limit_ramps"}}.get(name, set())
    assert constants.isdisjoint(layer.state_dict())
    for k, v in buffers.items():
        if k not in layer.running_stat_names:
            assert k == "example_weighing_alpha" or k in training_state | constants or not v.is_floating_point(), k
    # hn with per-example sets only has no running statistics; hn with one batch std set
    if name == "hn":
        assert build_norm("hn", 4, mean="in", std="gn:2").running_stat_names == ()
        assert build_norm("hn", 4, mean="ln", std="en:2").running_stat_names == ("running_var",)
