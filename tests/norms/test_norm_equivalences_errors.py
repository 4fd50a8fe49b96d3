"""The equivalences of issue 3, edge cases and their error messages, the registry."""

from __future__ import annotations

import norm_reference as R
import pytest
import torch
from torch import nn

from normlightning.norms import (
    BatchGroupNorm,
    BatchNorm,
    GeneralBatchGroupNorm,
    GhostNorm,
    GroupNorm,
    HeterologousNorm,
    InstanceNorm,
    NormLayer,
    PositionalNorm,
    SequentialNorm,
    available_norms,
    build_norm,
    register_norm,
    registry,
)

D64 = torch.float64


def _train_pair(a, b, shape, steps=3):
    torch.manual_seed(0)
    for _ in range(steps):
        x = torch.randn(shape, dtype=D64) * 2 + 1
        torch.testing.assert_close(a(x), b(x))
    a.eval(), b.eval()
    x = torch.randn(shape, dtype=D64)
    torch.testing.assert_close(a(x), b(x))


def test_ghost_gm1_is_bn():
    _train_pair(GhostNorm(4, num_groups=1, dtype=D64), nn.BatchNorm2d(4, dtype=D64), (5, 4, 3, 3))


def test_gbgn_full_batch_per_channel_is_bn_and_e1_is_gn():
    x = torch.randn(6, 4, 3, 3, dtype=D64)
    gb = GeneralBatchGroupNorm(4, channel_groups=4, examples_per_group=6, dtype=D64)
    torch.testing.assert_close(gb(x), nn.functional.batch_norm(x, None, None, training=True))
    gb2 = GeneralBatchGroupNorm(4, channel_groups=4, examples_per_group=None, dtype=D64)
    torch.testing.assert_close(gb2(x), nn.functional.batch_norm(x, None, None, training=True))
    gn = GeneralBatchGroupNorm(4, channel_groups=2, examples_per_group=1, dtype=D64)
    torch.testing.assert_close(gn(x), nn.functional.group_norm(x, 2))


def test_hn_std_bn_is_bn():
    _train_pair(HeterologousNorm(4, mean="bn", std="bn", dtype=D64), nn.BatchNorm2d(4, dtype=D64), (5, 4, 3, 3))


def test_en_c_is_bn():
    _train_pair(HeterologousNorm(4, mean="en:4", std="en:4", dtype=D64), nn.BatchNorm2d(4, dtype=D64), (5, 4, 3, 3))
    _train_pair(HeterologousNorm(4, mean="bn", std="en:4", dtype=D64), nn.BatchNorm1d(4, dtype=D64), (5, 4, 3))


def test_bgn_g_equals_c_on_2d_input_is_bn():
    _train_pair(BatchGroupNorm(4, num_groups=4, dtype=D64), nn.BatchNorm1d(4, dtype=D64), (6, 4))


def test_seqnorm_matches_gn_then_ghost_composition():
    torch.manual_seed(1)
    seq = SequentialNorm(4, channel_groups=2, batch_groups=2, dtype=D64)
    ghost = GhostNorm(4, num_groups=2, dtype=D64)
    x = torch.randn(6, 4, 3, dtype=D64)
    torch.testing.assert_close(seq(x), ghost(nn.functional.group_norm(x, 2)))
    torch.testing.assert_close(seq.running_var, ghost.running_var)


# ------------------------------------------------------------------ errors and edge cases
def test_registry_unknown_name_lists_valid_names():
    valid = "valid names: " + ", ".join(available_norms()) + r", or timm/<name>.* A plugin package"
    with pytest.raises(ValueError, match=valid):
        build_norm("batchnorm", 4)
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_norm("bn", 4, num_groups=2)


def test_registry_plugin_and_all_names_build():
    shipped = {
        "bn",
        "gn",
        "gnflat",
        "ln",
        "in",
        "pn",
        "ghost",
        "seqnorm",
        "bgn",
        "gbgn",
        "hn",
        "sn",
        "brn",
        "frn",
        "evonorm_b0",
        "evonorm_s0",
        "mabn",
        "cbn",
    }
    assert set(registry.BUILTIN_NORMS) == shipped and set(available_norms()) >= shipped
    for name in available_norms():
        layer = build_norm(name, 8, **R.group_counts(name, 4))
        assert isinstance(layer, NormLayer) and not isinstance(layer, nn.modules.batchnorm._BatchNorm)
        assert layer.weight.shape == (8,) and layer.bias.shape == (8,)
        layer(torch.randn(8, 8, 4, 4))
        if layer.uses_batch_statistics:
            assert hasattr(layer, "num_batches_tracked") and hasattr(layer, "momentum")
            layer.reset_running_stats()
            assert int(layer.num_batches_tracked) == 0
        if name in shipped:  # what docs/methods.md says of each shipped method
            assert layer.supports_example_weighing == (name in ("bn", "ghost", "gbgn"))
            assert layer.uses_batch_statistics == (name not in ("gn", "gnflat", "ln", "in", "pn", "frn", "evonorm_s0"))

    class Scale(nn.Module):
        def __init__(self, num_features, factor=2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    try:
        register_norm("scale_test", Scale)
        assert "scale_test" in available_norms()
        assert build_norm("scale_test", 3, factor=3.0).factor == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_norm("scale_test", lambda c: nn.Identity())
    finally:
        registry._REGISTRY.pop("scale_test", None)


def test_group_counts_that_do_not_divide():
    with pytest.raises(ValueError, match=r"num_groups=3 .*C=8.*\[1, 2, 4, 8\]"):
        GroupNorm(8, num_groups=3)
    with pytest.raises(ValueError, match=r"channel_groups=3.*C=8"):
        GeneralBatchGroupNorm(8, channel_groups=3)
    with pytest.raises(ValueError, match=r"channel_groups=3.*C=8"):
        SequentialNorm(8, channel_groups=3)
    with pytest.raises(ValueError, match=r"en:3 needs G dividing C=8.*\[1, 2, 4, 8\]"):
        HeterologousNorm(8, std="en:3")
    with pytest.raises(
        ValueError, match=r"num_groups=7 must divide D = C·H·W = 4·3·3 = 36.*\[1, 2, 3, 4, 6, 9, 12, 18, 36\]"
    ):
        BatchGroupNorm(4, num_groups=7)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("xn", "unknown set"),
        ("gn", "needs a group count"),
        ("bn:2", "takes no"),
        ("bn+bn", "listed twice"),
        ("", "expected a set name"),
    ],
)
def test_hn_spec_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        HeterologousNorm(8, std=spec)
    with pytest.raises(ValueError, match="only allowed for the std"):
        HeterologousNorm(8, mean="bn+ln")


def test_one_element_sets_in_training():
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        InstanceNorm(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        GhostNorm(3, num_groups=4)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        GeneralBatchGroupNorm(3, channel_groups=3, examples_per_group=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="one element"):
        HeterologousNorm(3, mean="in", std="ln")(torch.randn(4, 3))
    with pytest.raises(ValueError, match="one element"):
        PositionalNorm(1)(torch.randn(4, 1, 3))
    # eval mode is fine (running statistics)
    bn = BatchNorm(3).eval()
    assert torch.isfinite(bn(torch.randn(1, 3))).all()


def test_ghost_smaller_last_batch_policy():
    # N=10, G_M=4: nearly equal ghost batches (3, 3, 2, 2) -> tested against the reference
    layer = GhostNorm(2, num_groups=4, affine=False, dtype=D64)
    x = torch.randn(10, 2, 3, dtype=D64)
    torch.testing.assert_close(layer(x), R.ghost_train(x, 4)[0])
    # fewer examples than ghost batches -> error naming the fix
    with pytest.raises(ValueError, match=r"N=3 .* num_groups \(G_M\)=4.*drop_last"):
        layer(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="not both"):
        GhostNorm(2, num_groups=2, ghost_batch_size=4)


def test_gbgn_smaller_last_batch_policy():
    layer = GeneralBatchGroupNorm(2, channel_groups=1, examples_per_group=4, affine=False, dtype=D64)
    x = torch.randn(10, 2, 3, dtype=D64)  # 3 contiguous groups of sizes 4, 3, 3
    torch.testing.assert_close(layer(x), R.gbgn_train(x, 1, 4))


def test_bgn_spatial_size_change():
    torch.manual_seed(2)
    straddle = BatchGroupNorm(4, num_groups=8)  # groups split channels
    straddle(torch.randn(4, 4, 4, 4))
    straddle.eval()
    straddle(torch.randn(2, 4, 4, 4))  # same size: fine
    with pytest.raises(ValueError, match=r"trained at spatial size S=16.*got S=64"):
        straddle(torch.randn(2, 4, 8, 8))
    # the recorded size survives a checkpoint
    fresh = BatchGroupNorm(4, num_groups=8)
    fresh.load_state_dict(straddle.state_dict())
    fresh.eval()
    with pytest.raises(ValueError, match="trained at spatial size"):
        fresh(torch.randn(2, 4, 8, 8))
    # whole-channel groups work at another size, with the per-group running statistics
    whole = BatchGroupNorm(4, num_groups=2, affine=False)
    whole(torch.randn(4, 4, 4, 4))
    whole.eval()
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(whole(x), R.bgn_eval(x, 2, whole.running_mean, whole.running_var))


def test_input_checks():
    with pytest.raises(ValueError, match="num_features=4 but the input has C=3"):
        BatchNorm(4)(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="got 1D input"):
        GroupNorm(4, num_groups=2)(torch.randn(4))
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(4, momentum=2.0)
    with pytest.raises(ValueError, match="alpha"):
        BatchNorm(4).alpha = 1.5
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(0)


def test_affine_false_and_reset_parameters():
    for name in available_norms():
        kw = R.group_counts(name, 2)
        layer = build_norm(name, 4, affine=False, **kw)
        assert layer.weight is None and layer.bias is None
        layer = build_norm(name, 4, **kw)
        with torch.no_grad():
            layer.weight.fill_(3.0)
        layer.reset_parameters()
        assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.bias, torch.zeros(4))


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("sn", {}), ("bgn", {"num_groups": 2}), ("gbgn", {"channel_groups": 2})],
    ids=["sn", "bgn-channels", "gbgn-batch"],
)
def test_hand_written_backward_refuses_a_second_derivative(method, kwargs):
    """The fused pooled-set node (sn's training) and the node over native kernels of groups of whole channels
    (bgn with groups of several channels, gbgn with ``E = N``) have hand-written backwards: a double backward
    must raise, never return a wrong second derivative."""
    layer = build_norm(method, 4, **kwargs)
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):  # no second-order path to x
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("bgn", {"num_groups": 3}),  # groups straddling channels
        ("gbgn", {"channel_groups": 2, "examples_per_group": 2}),
    ],
    ids=["bgn-straddling", "gbgn-example-groups"],
)
def test_native_training_paths_have_the_second_derivative(method, kwargs):
    """bgn with groups straddling channels and gbgn with example groups of ``E < N`` train on native batch
    norms through autograd (issue 23), whose double backward is PyTorch's: input, weight and bias second
    derivatives match finite differences in float64 (gradgradcheck)."""
    layer = build_norm(method, 4, **kwargs).double()
    torch.manual_seed(0)
    x = torch.randn(4, 4, 3, 1, dtype=D64, requires_grad=True)
    w = (torch.rand(4, dtype=D64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=D64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("layer_dtype,input_dtype", [(torch.float32, D64), (D64, torch.float32)])
def test_bgn_buffers_of_another_dtype_than_the_input(layer_dtype, input_dtype):
    """bgn with groups of whole channels (the native batch norm with its running buffers) on an input of
    another dtype than its buffers: the output, and the buffers' update, of a layer in the input's dtype."""
    torch.manual_seed(0)
    x = torch.randn(4, 4, 3, 2, dtype=input_dtype) * 2 + 1
    ours = build_norm("bgn", 4, num_groups=2).to(layer_dtype)
    ref = build_norm("bgn", 4, num_groups=2).to(input_dtype)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean.to(layer_dtype))
    torch.testing.assert_close(ours.running_var, ref.running_var.to(layer_dtype))


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("gn", {"num_groups": 4}),
        ("gnflat", {"num_groups": 4}),
        ("in", {}),
        ("seqnorm", {"channel_groups": 4, "batch_groups": 1}),
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_a_per_example_set_of_one_value(method, kwargs, batch):
    """One value per set (``C/G * S = 1``): refused in training; at inference ``x - mu = 0``, so the output is
    the bias and the input gradient 0, for any batch (torch's GN kernel refuses ``N = 1``)."""
    layer = build_norm(method, 4, **kwargs)
    x = torch.randn(batch, 4, 1, 1) if method == "in" else torch.randn(batch, 4)
    with pytest.raises(ValueError, match=r"1 element\(s\) per normalization set; a set needs more than 1 value"):
        layer.train()(x)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(4.0))
    x.requires_grad_(True)
    y = layer.eval()(x)
    torch.testing.assert_close(y, torch.arange(4.0).view((1, 4) + (1,) * (x.dim() - 2)).expand_as(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
