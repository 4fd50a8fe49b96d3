"""normlightning.injection on plain torch models: replacement, rules, auto groups, fitting, summary."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from normlightning.callbacks.norm_injection import NormInjection
from normlightning.injection import get_spec, inject
from normlightning.injection import groups as group_rules
from normlightning.injection.apply import (
    apply_spec,
    copy_matching_state,
    mark_pretrained,
    pretrained_names,
    restore_injection,
)
from normlightning.injection.plan import probe_input_shapes
from normlightning.injection.spec import CHECKPOINT_KEY
from normlightning.norms import BatchNorm, GroupNorm, available_norms
from normlightning.norms.base import NormLayer
from normlightning.norms.batch_group_norm import bgn_paper_groups
from normlightning.norms.ghost_norm import ghost_auto_batches


def tiny_cnn() -> nn.Sequential:
    """conv(3->8) bn 8x8 -> conv(8->4, stride 2) bn 4x4 -> flatten -> linear(64->6) bn1d -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(64, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 3),
    )


def randomize_norms(model: nn.Module) -> None:
    """Give every native norm layer non-trivial affine params and running stats."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)


X = torch.rand(4, 3, 8, 8)


# ---------------------------------------------------------------- group rules (pure integers)
def test_bgn_auto_mapping_is_the_paper_table():
    table = {2: 1, 4: 2, 8: 16, 16: 64, 32: 128, 64: 256, 128: 512}
    assert {b: bgn_paper_groups(b) for b in table} == table
    assert bgn_paper_groups(1) == 1
    assert bgn_paper_groups(48) == 128  # largest tabulated batch <= 48 is 32
    assert bgn_paper_groups(256) == 1024  # 4 * B beyond the table
    with pytest.raises(ValueError, match="batch size"):
        bgn_paper_groups(0)


def test_ghost_auto_gives_ghost_batches_of_at_least_16():
    assert ghost_auto_batches(128) == 8  # the SeqNorm paper's G_M = 8 at batch 128
    assert ghost_auto_batches(16) == 1
    assert ghost_auto_batches(31) == 1
    assert ghost_auto_batches(96) == 6
    assert ghost_auto_batches(100) == 5  # 100 // 16 = 6 does not divide 100; 5 does


def test_fit_groups_error_names_layer_and_nearest_takes_largest_divisor_below():
    with pytest.raises(ValueError, match=r"layer 'body\.bn3'.*num_groups=12.*nearest.*\(10\)"):
        group_rules.fit_groups(12, 40, policy="error", layer="body.bn3", arg="num_groups", what="C=40")
    assert group_rules.fit_groups(12, 40, policy="nearest", layer="x", arg="num_groups", what="C=40") == (
        10,
        "num_groups 12->10 (must divide C=40)",
    )
    assert group_rules.fit_groups(8, 40, policy="error", layer="x", arg="g", what="C=40") == (8, None)


# ---------------------------------------------------------------- replacement
def test_bn_to_bn_copies_state_and_keeps_eval_outputs():
    model = tiny_cnn()
    randomize_norms(model)
    model.eval()
    expected = model(X)
    inject(model, method="bn")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model[1], NormLayer) and model[1].num_batches_tracked.item() == 7
    torch.testing.assert_close(model(X), expected)  # same running stats + affine -> same eval map


def test_gn_replacement_matches_native_group_norm_with_copied_affine():
    model = tiny_cnn()
    randomize_norms(model)
    w, b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    inject(model, method="gn", num_groups=2, targets=["BatchNorm2d"])[0]
    assert isinstance(model[7], nn.BatchNorm1d)  # not a target
    layer = model[1]
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(layer(x), nn.functional.group_norm(x, 2, w, b, 1e-5))


def test_overrides_first_match_wins_and_exclusions_keep_layers():
    model = tiny_cnn()
    spec, rows = inject(
        model,
        method="gn",
        num_groups=2,
        overrides=[
            {"pattern": r"[14]", "method": "in"},
            {"pattern": r"4", "method": "ln"},  # shadowed by the first rule
            {"pattern": r"7", "method": None},  # keep
        ],
        exclude=[r"1"],
    )
    assert isinstance(model[1], nn.BatchNorm2d)  # excluded wins over the override
    assert isinstance(model[7], nn.BatchNorm1d)  # method None keeps
    assert [(r["name"], r["method"]) for r in spec["layers"]] == [("4", "in")]
    assert "num_groups" not in spec["layers"][0]["kwargs"]  # a different method does not inherit gn's args
    rows = {r["layer"]: r for r in rows}
    assert rows["1"]["new"] == "(kept)" and rows["1"]["args"] == "excluded"
    assert "override 0" in rows["4"]["args"]


def test_unmatched_pattern_warns():
    with pytest.warns(UserWarning, match="matches no target layer"):
        inject(tiny_cnn(), method="gn", num_groups=2, exclude=["nothing_here"])[0]


def test_method_null_leaves_model_unchanged():
    model = tiny_cnn()
    before = list(model.modules())
    spec = inject(model, method=None)[0]
    assert spec["layers"] == [] and list(model.modules()) == before


def test_probe_records_input_shapes():
    shapes = probe_input_shapes(tiny_cnn().train(), X, ["1", "4", "7"])
    assert shapes == {"1": (4, 8, 8, 8), "4": (4, 4, 4, 4), "7": (4, 6)}


def test_bgn_auto_fits_each_layer_from_probe():
    model = tiny_cnn()
    running_before = model[1].running_mean.clone()
    spec, rows = inject(model, method="bgn", num_groups="auto", batch_size=32, targets=["BatchNorm2d"], example_input=X)
    torch.testing.assert_close(running_before, torch.zeros(8))
    groups = {r["name"]: r["kwargs"]["num_groups"] for r in spec["layers"]}
    # B=32 -> G=128; layer 1: D = 8*8*8 = 512 -> 128 fits; layer 4: D = 4*4*4 = 64 -> nearest divisor 64
    assert groups == {"1": 128, "4": 64}
    assert "num_groups auto->128 (B=32)" in rows[1]["args"]
    assert "num_groups 128->64" in rows[1]["args"]
    model.train()
    assert model(X).shape == (4, 3)


def test_bgn_explicit_groups_error_names_layer_and_nearest_fits():
    # layer 1: D = 8*64 = 512 takes 128; layer 4: D = 4*16 = 64 does not
    with pytest.raises(ValueError, match=r"layer '4'.*num_groups=128 does not divide D=C\*S=4\*16=64.*\(64\)"):
        inject(tiny_cnn(), method="bgn", num_groups=128, targets=["BatchNorm2d"], example_input=X)[0]
    spec = inject(
        tiny_cnn(), method="bgn", num_groups=48, group_fit="nearest", targets=["BatchNorm2d"], example_input=X
    )[0]
    assert [r["kwargs"]["num_groups"] for r in spec["layers"]] == [32, 32]  # largest divisors <= 48 of 512, 64


def test_bgn_without_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="example_input_array"):
        inject(tiny_cnn(), method="bgn", num_groups=4)[0]


def test_gn_group_count_that_does_not_divide_c_errors_with_layer_name():
    with pytest.raises(ValueError, match=r"layer '1'.*num_groups=3 does not divide C=8"):
        inject(tiny_cnn(), method="gn", num_groups=3, targets=["BatchNorm2d"])[0]


def test_ghost_and_seqnorm_auto():
    spec = inject(tiny_cnn(), method="ghost", num_groups="auto", batch_size=64, targets=["BatchNorm2d"])[0]
    assert {r["kwargs"]["num_groups"] for r in spec["layers"]} == {4}  # 64 / 16
    spec = inject(tiny_cnn(), method="seqnorm", num_groups="auto", batch_size=128, targets=["BatchNorm2d"])[0]
    got = [(r["kwargs"]["channel_groups"], r["kwargs"]["batch_groups"]) for r in spec["layers"]]
    assert got == [(4, 8), (4, 8)]
    with pytest.raises(ValueError, match="seqnorm takes channel_groups"):
        inject(tiny_cnn(), method="seqnorm", num_groups=4)[0]


def test_auto_without_batch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="norm.batch_size"):
        inject(tiny_cnn(), method="ghost", num_groups="auto")[0]


@pytest.mark.parametrize(
    ("native", "shape"),
    [
        (nn.GroupNorm(2, 8), (2, 8, 3, 3)),
        (nn.InstanceNorm2d(8, affine=True), (2, 8, 3, 3)),
        (nn.LayerNorm(8), (2, 8)),
    ],
)
def test_other_target_types(native, shape):
    model = nn.Sequential(native)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.normal_()
    x = torch.randn(shape)
    expected = native(x)
    method = {nn.GroupNorm: "gn", nn.InstanceNorm2d: "in", nn.LayerNorm: "ln"}[type(native)]
    inject(model, method=method, num_groups=2 if method == "gn" else None, targets=[type(native).__name__])[0]
    assert isinstance(model[0], NormLayer)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_spec_replays_on_a_fresh_model_and_is_idempotent():
    model = tiny_cnn()
    spec = inject(model, method="bgn", num_groups=4, targets=["BatchNorm2d"], example_input=X)[0]
    fresh = tiny_cnn()
    assert apply_spec(fresh, spec) == 2
    assert get_spec(fresh) == spec
    fresh.load_state_dict(model.state_dict())
    assert apply_spec(fresh, spec) == 0  # already carries it
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(X), model(X))


def conv_bn() -> nn.Sequential:
    """conv(3->4, 1x1) -> BatchNorm2d(4)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


def test_copy_matching_state_copies_the_affine_parameters_and_buffers_both_layers_have_at_the_same_shape():
    old = nn.BatchNorm2d(4)
    randomize_norms(nn.Sequential(old))
    statistics_only = nn.Module()  # no weight / bias attribute at all
    statistics_only.register_buffer("running_mean", torch.zeros(4))
    statistics_only.register_buffer("running_var", torch.zeros(2))  # another shape: not copied
    assert copy_matching_state(old, statistics_only) == ["running_mean"]
    assert torch.equal(statistics_only.running_mean, old.running_mean) and statistics_only.running_var.sum() == 0
    untracked = nn.BatchNorm2d(4, affine=False, track_running_stats=False)  # weight, bias, statistics all None
    assert copy_matching_state(old, untracked) == []
    plain = nn.BatchNorm2d(4, affine=False)
    assert copy_matching_state(old, plain) == ["running_mean", "running_var", "num_batches_tracked"]
    assert plain.weight is None and int(plain.num_batches_tracked) == 7
    back = nn.BatchNorm2d(4)
    assert copy_matching_state(statistics_only, back) == ["running_mean"]
    assert back.weight.tolist() == [1.0] * 4 and torch.equal(back.running_mean, old.running_mean)


def test_copy_state_false_builds_fresh_layers_without_copy_notes():
    model = tiny_cnn()
    randomize_norms(model)
    _, rows = inject(model, method="bn", targets=["BatchNorm2d"], copy_state=False)
    assert model[1].running_mean.tolist() == [0.0] * 8 and model[1].weight.tolist() == [1.0] * 8
    assert int(model[1].num_batches_tracked) == 0 and all("copied" not in r["args"] for r in rows)


def test_a_layer_whose_only_tensor_is_an_integer_counter_is_replaced_without_taking_its_dtype():
    counter_only = nn.BatchNorm2d(4, affine=False)
    counter_only.running_mean = counter_only.running_var = None  # what is left: num_batches_tracked (int64)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), counter_only)
    inject(model, method="gn", num_groups=2)  # the device is taken, an integer dtype is not
    assert isinstance(model[1], GroupNorm) and model[1].num_groups == 2 and not model[1].affine


def test_new_layers_take_each_old_layers_training_mode_and_dtype():
    model = tiny_cnn().double().eval()
    model[4].train()  # one layer left in training mode
    inject(model, method="gn", num_groups=2, targets=["BatchNorm2d"])
    assert (model[1].training, model[4].training) == (False, True)
    assert model[1].weight.dtype == model[4].bias.dtype == torch.float64


def test_apply_spec_refuses_a_layer_without_the_modules_to_carry():
    spec, _ = inject(conv_bn(), method="gn", num_groups=2)
    spec["layers"][0]["carried"] = ["act"]  # written for a layer with an activation inside (timm's BatchNormAct2d)
    with pytest.raises(
        ValueError,
        match=r"^layer '1' \(BatchNorm2d\) has no module\(s\) \['act'\] to carry over; the model differs from the "
        r"one the injection spec was made for$",
    ):
        apply_spec(conv_bn(), spec)


def test_apply_spec_counts_rebuilt_layers_and_new_parameter_normalizations_and_stores_the_spec():
    spec, _ = inject(conv_bn(), method="bn", param_norm="weight_standardization")
    fresh = conv_bn()
    with torch.no_grad():
        fresh[1].running_mean.fill_(5.0), fresh[1].weight.fill_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model without a spec is rebuilt silently
        assert apply_spec(fresh, spec) == 2  # one layer + one weight standardization
    assert isinstance(fresh[1], BatchNorm) and get_spec(fresh) == spec
    # freshly initialised, not copied from the old layer: the state_dict loaded next fills it
    assert fresh[1].running_mean.tolist() == [0.0] * 4 and fresh[1].weight.tolist() == [1.0] * 4
    renoted = copy.deepcopy(spec)
    renoted["layers"][0]["notes"] = ["written by another run"]
    assert apply_spec(fresh, renoted) == 0  # the same layers: nothing rebuilt, the checkpoint's spec kept
    assert get_spec(fresh) == renoted


def test_apply_spec_over_another_spec_warns_at_the_caller_and_rebuilds_the_checkpoints_layers(warning_sites):
    spec, _ = inject(conv_bn(), method="bn", param_norm="weight_standardization")
    model = conv_bn()
    inject(model, method="gn", num_groups=2, param_norm="weight_standardization")
    with pytest.warns(
        UserWarning,
        match=r"^the model already carries a different norm injection spec \(e\.g\. the `norm:` config changed since "
        r"the checkpoint was written\); rebuilding the layers the checkpoint lists$",
    ) as record:
        assert apply_spec(model, spec) == 1  # the layer; the weight standardization is already there
    assert warning_sites(record) == ["caller"]
    assert isinstance(model[1], BatchNorm) and get_spec(model) == spec
    assert len(model[0].parametrizations.weight) == 1


def test_apply_spec_refuses_other_parameter_normalizations_naming_the_layers():
    wn_spec, _ = inject(conv_bn(), method="gn", num_groups=2, param_norm="weight_norm")
    plain_spec, _ = inject(conv_bn(), method="gn", num_groups=2)
    fix = (
        "; build the model with the same `norm.weight_standardization` / `norm.weight_norm` settings as the checkpoint"
    )
    for spec in (wn_spec, plain_spec):  # another kind on layer 0; none where the model has one on layer 0
        model = conv_bn()
        inject(model, method="gn", num_groups=2, param_norm="weight_standardization")
        with pytest.raises(
            ValueError,
            match=re.escape("the model's weight standardization / weight norm differs from the checkpoint's on ['0']")
            + re.escape(fix),
        ):
            with pytest.warns(UserWarning, match="already carries a different norm injection spec"):
                apply_spec(model, spec)


def test_restore_injection_applies_the_checkpoints_spec_or_nothing():
    spec, _ = inject(conv_bn(), method="gn", num_groups=2)
    model = conv_bn()
    assert restore_injection(model, {"state_dict": {}}) == 0
    assert get_spec(model) is None and type(model[1]) is nn.BatchNorm2d
    assert restore_injection(model, {CHECKPOINT_KEY: spec}) == 1
    assert isinstance(model[1], GroupNorm) and model[1].num_groups == 2


def test_marked_pretrained_tensors_are_recorded_per_module_and_named_in_the_summary():
    model = nn.Sequential(conv_bn(), *(nn.BatchNorm2d(4) for _ in range(3)), nn.BatchNorm2d(4, affine=False))
    mark_pretrained(model, ["0.0.weight", "0.1.weight", "0.1.bias"])
    mark_pretrained(model, ["0.1.running_mean", "0.1.running_var"])  # added to the first record
    mark_pretrained(model, [f"2.{name}" for name, _ in model[2].named_buffers()] + ["2.weight", "2.bias"])
    mark_pretrained(model, ["4.running_mean", "4.running_var"])  # the statistics alone
    assert pretrained_names(model[0][1]) == frozenset({"weight", "bias", "running_mean", "running_var"})
    assert pretrained_names(model[0][0]) == frozenset({"weight"})
    assert pretrained_names(model) == pretrained_names(model[0]) == pretrained_names(model[1]) == frozenset()
    with torch.no_grad():
        model[1].num_batches_tracked.fill_(1)  # trained one step, not loaded: its copy is noted without "pretrained"
    _, rows = inject(model, method="bn")
    assert isinstance(model[0][1], BatchNorm) and not hasattr(model, "0.1")  # replaced inside its parent
    copied = "copied weight, bias, running_mean, running_var, num_batches_tracked"
    assert [r["args"].partition("  ")[2] for r in rows] == [
        f"[{copied} (pretrained: weight, bias, running_mean, running_var); pretrained statistics]",
        f"[{copied}]",
        f"[{copied} (pretrained); pretrained statistics]",
        "",  # a fresh layer: copying its initial values is no news
        "[copied running_mean, running_var, num_batches_tracked (pretrained: running_mean, running_var); "
        "pretrained statistics]",
    ]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="group_fit"):
        NormInjection(method="gn", group_fit="closest")
    with pytest.raises(ValueError, match="exclusive"):
        NormInjection(method="gn", weight_standardization=True, weight_norm=True)
    with pytest.raises(ValueError, match="not a torch.nn module class"):
        NormInjection(method="gn", targets=["BatchNorm9d"])
    with pytest.raises(ValueError, match="regular expression"):
        NormInjection(method="gn", exclude=["("])
    with pytest.raises(ValueError, match="'pattern' key"):
        NormInjection(method="gn", overrides=[{"method": "bn"}])
    with pytest.raises(ValueError, match=r"norm.method: Unknown normalization 'nope'"):
        inject(tiny_cnn(), method="nope")[0]


def test_num_groups_fills_the_group_count_each_method_declares():
    """``norm.num_groups`` goes to the argument the layer class declares with ``takes_num_groups``:
    gbgn's ``channel_groups``, gn's and bgn's ``num_groups``."""
    spec = inject(tiny_cnn(), method="gbgn", num_groups=2, targets=["BatchNorm2d"])[0]
    assert [r["kwargs"]["channel_groups"] for r in spec["layers"]] == [2, 2]
    assert all("num_groups" not in r["kwargs"] for r in spec["layers"])
    with pytest.raises(ValueError, match="bn takes no group count"):
        inject(tiny_cnn(), method="bn", num_groups=2)[0]


def test_named_auto_policy_and_unknown_policy():
    model = tiny_cnn()
    spec = inject(
        model,
        method="bgn",
        num_groups="auto:paper",
        batch_size=8,
        targets=["BatchNorm2d"],
        example_input=torch.zeros(2, 3, 8, 8),
    )[0]
    assert [r["kwargs"]["num_groups"] for r in spec["layers"]] == [16, 16]  # B=8 -> 16, divides 512 and 64
    with pytest.raises(ValueError, match=r"unknown auto policy 'nope'.*auto:paper"):
        inject(tiny_cnn(), method="bgn", num_groups="auto:nope", batch_size=8, example_input=torch.zeros(2, 3, 8, 8))[0]
    with pytest.raises(ValueError, match="gn num_groups has no 'auto' rule"):
        inject(tiny_cnn(), method="gn", num_groups="auto", batch_size=8)[0]


def test_a_method_name_typo_fails_when_the_settings_are_built_and_lists_the_valid_names():
    """Before any data or model is touched: the `norm:` section itself is rejected."""
    valid = "valid names: " + ", ".join(available_norms())  # every registered method, plugins too
    with pytest.raises(ValueError, match=f"norm.method: Unknown normalization 'bgnn'; {valid}"):
        NormInjection(method="bgnn")
    with pytest.raises(ValueError, match=f"norm.overrides\\[1\\].method: Unknown normalization 'gnn'; {valid}"):
        NormInjection(method="bn", overrides=[{"pattern": "a"}, {"pattern": "b", "method": "gnn"}])
    with pytest.raises(ValueError, match="norm.method: Unknown normalization 'bgnn'"):
        inject(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), method="bgnn")
