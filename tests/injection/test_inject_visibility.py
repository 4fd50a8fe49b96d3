"""What runs is what was asked, visibly: effective layer arguments in the summary and the logged
hyperparameters, group counts without a default, and ``inject`` on models it cannot or need not change."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from normlightning.callbacks.run_hparams import norm_hparams
from normlightning.injection import InjectionRules, get_spec, inject
from normlightning.injection.apply import apply_spec
from normlightning.norms import BatchGroupNorm, GroupNorm, HeterologousNorm
from normlightning.norms.sequential_norm import SequentialNorm


def wide_net() -> nn.Sequential:
    """conv(3->32) bn -> relu -> conv(32->32) bn: two 32-channel BatchNorm2d layers at 4x4."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
    )


X = torch.rand(2, 3, 8, 8)


# ---------------------------------------------------------------- hidden settings
@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("gn", "num_features=32, num_groups=32, eps=1e-05, affine=True"),  # GN's default G = 32 is IN here
        ("hn", "num_features=32, mean=bn, std=en:1, eps=1e-05, momentum=0.1, affine=True, virtual_devices=1"),
        (
            "ghost",
            "num_features=32, num_groups=None, ghost_batch_size=32, eps=1e-05, momentum=0.1, affine=True, alpha=0.0, "
            "virtual_devices=1",
        ),
        (
            "gbgn",
            "num_features=32, channel_groups=32, examples_per_group=None, eps=1e-05, momentum=0.01, affine=True, "
            "alpha=0.0, virtual_devices=1",
        ),
    ],
)
def test_summary_shows_every_effective_argument_of_the_built_layer(method, expected):
    model = wide_net()
    _, rows = inject(model, method=method)
    assert [r["args"] for r in rows] == [expected, expected]
    layer = model[1]
    # the values are the layer's own (the attributes it normalizes with), not the settings' (none given)
    if method == "gn":
        assert isinstance(layer, GroupNorm) and layer.num_groups == 32
    if method == "hn":
        assert isinstance(layer, HeterologousNorm) and (layer.mean_spec, layer.std_spec) == ("bn", "en:1")


def test_summary_reads_fitted_counts_from_each_layer():
    model = wide_net()
    _, rows = inject(model, method="bgn", num_groups=48, group_fit="nearest", example_input=X)
    # D = C*H*W = 32*8*8 = 2048 and 32*4*4 = 512: the largest divisor <= 48 of each is 32
    assert [model[1].num_groups, model[4].num_groups] == [32, 32]
    assert all(
        r["args"].startswith("num_features=32, num_groups=32, eps=1e-05, momentum=0.1, affine=True") for r in rows
    )


def test_logged_hyperparameters_hold_the_effective_values_compact_when_layers_differ():
    model = wide_net()
    rules = InjectionRules(method="gn")
    spec, _ = inject(model, rules)
    params = norm_hparams(model, spec, rules)
    assert params["groups"] == {"num_groups": 32}
    assert params["args"] == {"gn": {"num_groups": 32, "eps": 1e-5, "affine": True}}
    assert params["num_groups_setting"] is None  # what was asked, beside what runs

    model = wide_net()
    rules = InjectionRules(method="bgn", num_groups="auto", overrides=[{"pattern": "4", "method": "hn"}])
    spec, _ = inject(model, rules, example_input=X, batch_size=32)
    params = norm_hparams(model, spec, rules)
    # B = 32 -> the paper's G = 128, which divides D = 32*64 of layer 1; layer 4 is hn with its default sets
    assert params["args"] == {
        "bgn": {"num_groups": 128, "eps": 1e-5, "momentum": 0.1, "affine": True, "virtual_devices": 1},
        "hn": {"mean": "bn", "std": "en:1", "eps": 1e-5, "momentum": 0.1, "affine": True, "virtual_devices": 1},
    }
    model = wide_net()
    rules = InjectionRules(method="gn", overrides=[{"pattern": "4", "num_groups": 8}])
    spec, _ = inject(model, rules)
    assert norm_hparams(model, spec, rules)["args"]["gn"]["num_groups"] == "32,8"  # distinct values, model order


def test_group_counts_without_a_default_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"bgn has no default for num_groups.*set norm\.num_groups \(an int or auto\)"):
        inject(wide_net(), method="bgn", example_input=X)
    with pytest.raises(
        ValueError,
        match=r"seqnorm has no default for channel_groups, batch_groups.*norm\.num_groups: auto \(sets channel_groups "
        r"and batch_groups\), or norm\.kwargs\.channel_groups and norm\.kwargs\.batch_groups or "
        r"norm\.kwargs\.ghost_batch_size",
    ):
        inject(wide_net(), method="seqnorm")
    with pytest.raises(ValueError, match=r"seqnorm has no default for batch_groups"):
        inject(wide_net(), method="seqnorm", kwargs={"channel_groups": 4})
    with pytest.raises(TypeError, match="num_groups"):
        BatchGroupNorm(8)
    with pytest.raises(ValueError, match="batch_groups .* or ghost_batch_size"):
        SequentialNorm(8, channel_groups=2)
    # given, they build: ghost_batch_size stands in for batch_groups
    _, rows = inject(wide_net(), method="seqnorm", kwargs={"channel_groups": 4, "ghost_batch_size": 8})
    assert "channel_groups=4, batch_groups=None, ghost_batch_size=8" in rows[0]["args"]


# ---------------------------------------------------------------- the surgery API on odd models
def test_inject_on_a_model_without_target_layers_warns_naming_targets():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    with pytest.warns(
        UserWarning,
        match=r"nothing in Sequential was replaced.*its normalization layers are GroupNorm: "
        r"name them in targets \(norm\.targets: \['GroupNorm'\]\)",
    ):
        spec, _ = inject(model, method="gn", num_groups=2)
    assert spec["layers"] == [] and isinstance(model[1], nn.GroupNorm)
    _, rows = inject(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)), method="gn", num_groups=2, targets=["GroupNorm"]
    )  # the fix the warning names
    assert rows[0]["new"] == "GroupNorm (gn)"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inject_refuses_torchscript_modules():
    eager = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with pytest.raises(TypeError, match="the model itself is a TorchScript module.*inject into the eager nn.Module"):
        inject(torch.jit.script(eager), method="gn", num_groups=2)
    wrapper = nn.Sequential(torch.jit.script(eager), nn.ReLU())
    with pytest.raises(TypeError, match="0 is a TorchScript module"):
        inject(wrapper, method="gn", num_groups=2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inject_names_the_first_three_torchscript_modules():
    def scripted() -> torch.jit.ScriptModule:  # holds scripted submodules: only the outermost is named
        return torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())

    wrapper = nn.Sequential(scripted(), nn.ReLU(), scripted(), scripted(), scripted())
    with pytest.raises(TypeError, match=r"^inject: 0, 2, 3 are TorchScript module\(s\) \(torch\.jit\.script"):
        inject(wrapper, method="gn", num_groups=2)


@pytest.mark.parametrize(("method", "settings"), [("bgn", {"num_groups": 4}), ("bn", {})])
def test_inject_on_a_meta_device_model_builds_meta_layers_that_materialize(method, settings):
    with torch.device("meta"):
        meta = wide_net()
    inject(meta, method=method, example_input=X, **settings)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    reference = wide_net()
    inject(reference, method=method, example_input=X, **settings)
    with torch.no_grad():  # running statistics that are not their initial values
        for name, buffer in reference.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
    meta.to_empty(device="cpu")
    meta.load_state_dict(reference.state_dict())
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(meta.eval()(x), reference.eval()(x), rtol=0, atol=0)


def test_inject_twice_with_other_settings_raises_and_the_same_settings_return_the_spec():
    model = wide_net()
    spec, _ = inject(model, method="bgn", num_groups=4, example_input=X)
    with pytest.raises(ValueError, match=r"already carries injected layers.*1: has bgn, asked gn"):
        inject(model, method="gn", num_groups=8)
    with pytest.raises(ValueError, match=r"1: has bgn with num_groups=4, asked num_groups=8"):
        inject(model, method="bgn", num_groups=8, example_input=X)
    with pytest.raises(ValueError, match=r"parameter normalization: has none, asked weight_standardization"):
        inject(model, method="bgn", num_groups=4, param_norm="weight_standardization")
    again, rows = inject(model, method="bgn", num_groups=4, example_input=X)
    assert again == get_spec(model) == spec and isinstance(model[1], BatchGroupNorm) and model[1].num_groups == 4
    assert len(rows) == 2


def test_inject_again_lists_every_conflicting_layer_and_argument():
    model = wide_net()
    inject(model, method="gn", num_groups=8, param_norm="weight_standardization", param_norm_exclude=["3"])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "(1: has gn, asked to keep the original layer; 4: has gn, asked to keep the original layer; "
            "parameter normalization: has ['weight_standardization'], asked none). Inject once"
        ),
    ):
        inject(model, method=None)
    no_param_norm = "(parameter normalization: has ['weight_standardization'], asked none)"
    with pytest.raises(ValueError, match=re.escape(no_param_norm)):
        inject(model, method="gn", num_groups=8)
    # the same settings (with a parameter-normalization exclusion pattern) return the spec
    again, _ = inject(model, method="gn", num_groups=8, param_norm="weight_standardization", param_norm_exclude=["3"])
    assert again == get_spec(model) and again["param_norms"] == [{"name": "0", "kind": "weight_standardization"}]


def test_inject_again_compares_fitted_counts_by_method_only_and_the_other_arguments_by_value():
    """``group_fit: nearest`` fits a channel count per layer (gn 3 -> 2 on 32 channels), so asking 3 again is
    no conflict; a batch count (ghost's) is never fitted, and the arguments after a fitted one are compared."""
    model = wide_net()
    inject(model, method="gn", num_groups=3, group_fit="nearest")
    assert model[1].num_groups == 2
    inject(model, method="gn", num_groups=3, group_fit="nearest")
    model = wide_net()
    inject(model, method="gbgn", kwargs={"channel_groups": 5, "eps": 1e-5}, group_fit="nearest")
    assert model[1].channel_groups == 4
    with pytest.raises(ValueError, match=re.escape("(1: has gbgn with eps=1e-05, asked eps=0.001; 4: has gbgn")):
        inject(model, method="gbgn", kwargs={"channel_groups": 5, "eps": 1e-3}, group_fit="nearest")
    model = wide_net()
    inject(model, method="ghost", num_groups=2, group_fit="nearest")
    with pytest.raises(ValueError, match=re.escape("(1: has ghost with num_groups=2, asked num_groups=4; 4:")):
        inject(model, method="ghost", num_groups=4, group_fit="nearest")


def test_inject_again_skips_auto_counts_and_reads_overrides_by_layer_name():
    model = wide_net()
    spec, _ = inject(model, method="ghost", num_groups="auto", batch_size=64)
    assert [r["kwargs"]["num_groups"] for r in spec["layers"]] == [4, 4]  # 64 / 16
    assert inject(model, method="ghost", num_groups="auto", batch_size=64)[0] == spec
    model = wide_net()
    settings = {"method": "gn", "num_groups": 4, "overrides": [{"pattern": "4", "num_groups": 8}]}
    spec, _ = inject(model, **settings)
    assert (model[1].num_groups, model[4].num_groups) == (4, 8)
    assert inject(model, **settings)[0] == spec
    with pytest.raises(ValueError, match=re.escape("(4: has gn with num_groups=8, asked num_groups=4)")):
        inject(model, method="gn", num_groups=4)


def test_inject_without_norm_layers_warns_naming_the_targets_and_the_fix():
    with pytest.warns(UserWarning) as record:
        inject(nn.Sequential(nn.Linear(2, 2)), method="gn", num_groups=2, targets=["BatchNorm2d", "BatchNorm1d"])
    assert [str(w.message) for w in record] == [
        "inject: nothing in Sequential was replaced: it has no layer of the target types (BatchNorm2d, BatchNorm1d); "
        "name its normalization layer classes in targets (norm.targets), a torch.nn name or 'package.module.Class'"
    ]
    with pytest.warns(UserWarning) as record:
        inject(nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.GroupNorm(1, 4)), method="gn", num_groups=2)
    assert str(record[0].message).endswith(
        "its normalization layers are GroupNorm, LayerNorm: "
        "name them in targets (norm.targets: ['GroupNorm', 'LayerNorm'])"
    )


def test_inject_again_names_the_first_three_conflicts():
    model = nn.Sequential(wide_net(), nn.BatchNorm2d(32), nn.BatchNorm2d(32))
    inject(model, method="gn", num_groups=8)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "inject: the model already carries injected layers, and these settings ask for others (0.1: has gn, asked "
            "to keep the original layer; 0.4: has gn, asked to keep the original layer; 1: has gn, asked to keep the "
            "original layer; ...). Inject once, into the model with its original layers: build the model again (and "
            "load its weights) before injecting other settings"
        ),
    ):
        inject(model, method=None)


def test_inject_takes_rules_or_keyword_settings_but_not_both():
    rules = InjectionRules(method="gn", num_groups=8)
    with pytest.raises(TypeError, match=r"^inject: give either `rules` or keyword settings, not both$"):
        inject(wide_net(), rules, method="bn")
    model = wide_net()
    spec, rows = inject(model, rules)
    assert [r["name"] for r in spec["layers"]] == ["1", "4"] and isinstance(model[4], GroupNorm)
    assert [r["new"] for r in rows] == ["GroupNorm (gn)", "GroupNorm (gn)"]


def test_only_an_injection_that_changes_nothing_it_was_asked_to_is_silent(warning_sites):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec, _ = inject(nn.Sequential(nn.Linear(2, 2)), method=None)  # asked for nothing
        assert spec["layers"] == spec["param_norms"] == []
        model = nn.Sequential(nn.Conv2d(3, 4, 1))
        spec, _ = inject(model, method="gn", num_groups=2, param_norm="weight_standardization")  # no norm layer
        assert spec["param_norms"] == [{"name": "0", "kind": "weight_standardization"}]
        assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight")
    with pytest.warns(UserWarning, match="nothing in Sequential was replaced") as record:
        inject(nn.Sequential(nn.Linear(2, 2)), method="gn", num_groups=2)
    assert warning_sites(record) == ["caller"]  # the caller's line, not apply.py or pytest's


def test_a_spec_that_replaces_the_root_module_is_refused_naming_the_fix():
    spec, _ = inject(nn.Sequential(nn.BatchNorm2d(4)), method="gn", num_groups=2)
    spec["layers"][0]["name"] = ""  # the model itself
    with pytest.raises(ValueError, match=r"^cannot replace the root module itself; wrap it in a container first$"):
        apply_spec(nn.BatchNorm2d(4), spec)


def test_inject_with_every_target_layer_excluded_warns_that_they_were_kept():
    with pytest.warns(UserWarning) as record:
        _, rows = inject(wide_net(), method="gn", num_groups=8, exclude=["1", "4"])
    assert [str(w.message) for w in record] == [
        "inject: nothing in Sequential was replaced: all 2 of its target layers were kept (excluded, or subclasses: "
        "see the summary)"
    ]
    assert [(r["layer"], r["new"], r["args"]) for r in rows] == [
        ("1", "(kept)", "excluded"),
        ("4", "(kept)", "excluded"),
    ]


def test_a_missing_group_count_fails_when_the_settings_are_built():
    """Before data or model setup (the CLI builds the callback first), when every layer takes the global settings."""
    from normlightning.callbacks.norm_injection import NormInjection

    with pytest.raises(ValueError, match=r"norm\.method: bgn has no default for num_groups.*set norm\.num_groups"):
        NormInjection(method="bgn")
    with pytest.raises(ValueError, match=r"norm\.method: seqnorm has no default for batch_groups"):
        NormInjection(method="seqnorm", kwargs={"channel_groups": 4})
    assert NormInjection(method="seqnorm", num_groups="auto").rules.method == "seqnorm"


def test_the_callback_refuses_a_model_injected_with_other_settings():
    from types import SimpleNamespace

    from lightning.pytorch import LightningModule

    from normlightning.callbacks.norm_injection import NormInjection

    class Task(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = wide_net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    task = Task()
    inject(task, method="bgn", num_groups=4, example_input=X)
    with pytest.raises(ValueError, match=r"already carries injected layers.*net\.1: has bgn, asked gn"):
        NormInjection(method="gn").setup(SimpleNamespace(datamodule=None), task, "fit")


def test_inject_into_a_bare_norm_layer_is_refused_naming_the_fix():
    """The root module cannot be replaced in place: a bare target layer is refused with the fix (it used to
    warn that the model had no layer of the target types, although it is one)."""
    with pytest.raises(
        ValueError,
        match=r"^inject: the model is itself a BatchNorm2d, one of the target layers.*"
        r"wrap the layer in a container first, e\.g\. nn\.Sequential\(layer\)$",
    ):
        inject(nn.BatchNorm2d(4), method="gn", num_groups=2)
    wrapped = nn.Sequential(nn.BatchNorm2d(4))
    inject(wrapped, method="gn", num_groups=2)
    assert isinstance(wrapped[0], GroupNorm)
