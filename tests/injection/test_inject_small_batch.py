"""The small-batch baselines through the `norm:` injection and the CLI: `frn` (its TLU note in the
summary), `timm/<name>` (any layer of timm's norm registries, arguments checked and shown)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from normlightning.cli import build_cli
from normlightning.injection import get_spec, inject
from normlightning.injection.apply import apply_spec
from normlightning.norms import build_norm

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.fast_dev_run=true"]


def _conv_bn_relu() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_timm_evonorms0_is_injected_with_its_arguments_in_the_summary() -> None:
    layers = pytest.importorskip("timm.layers")
    model = _conv_bn_relu()
    spec, rows = inject(model, method="timm/evonorms0", kwargs={"groups": 2})
    assert type(model[1]) is layers.EvoNorm2dS0 and model[1].groups == 2
    assert rows[0]["new"] == "EvoNorm2dS0 (timm/evonorms0)"
    assert rows[0]["args"] == "num_features=4, groups=2, group_size=None, apply_act=True, eps=1e-05"
    reference = _conv_bn_relu()
    reference[1] = layers.EvoNorm2dS0(4, groups=2, eps=1e-5)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(model(x), reference(x))
    assert spec["layers"][0]["method"] == "timm/evonorms0"


def test_timm_layers_refuse_what_they_would_swallow() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"timm/evonorms0 \(EvoNorm2dS0\) takes no argument\(s\) \['num_groups'\]"):
        build_norm("timm/evonorms0", 4, num_groups=2)
    with pytest.raises(ValueError, match="affine=False cannot be honoured"):
        inject(_conv_bn_relu(), method="timm/evonormb0", kwargs={"affine": False})
    unknown = "norm.method: .*timm has no norm layer named 'evonorm'; valid timm/<name>: batchnorm"
    with pytest.raises(ValueError, match=unknown):
        inject(_conv_bn_relu(), method="timm/evonorm")


def test_timm_method_without_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'timm/\'evonorms0\'.* pip install "normlightning\[timm\]"'):
        build_norm("timm/evonorms0", 4)


def test_frn_summary_says_the_models_activation_is_kept() -> None:
    model = _conv_bn_relu()
    _, rows = inject(model, method="frn")
    assert rows[0]["new"] == "FilterResponseNorm (frn)"
    assert "tlu=True" in rows[0]["args"] and "the model's activation after the layer is kept" in rows[0]["args"]
    assert isinstance(model[2], nn.ReLU)  # kept: relu(max(y, tau)) = max(y, max(tau, 0))
    _, rows = inject(_conv_bn_relu(), method="frn", kwargs={"tlu": False})
    assert "activation" not in rows[0]["args"]


def test_remove_following_activation_lets_the_tlu_replace_the_relu() -> None:
    """With the option the ReLU after each frn is an Identity: ``max(y, tau)`` with ``tau < 0`` reaches
    the next layer, which the kept ReLU (``max(y, tau, 0)``) would floor at 0."""
    removed, kept = _conv_bn_relu(), _conv_bn_relu()
    _, rows = inject(removed, method="frn", remove_following_activation=True, example_input=torch.zeros(1, 3, 5, 5))
    inject(kept, method="frn")
    assert isinstance(removed[2], nn.Identity) and isinstance(kept[2], nn.ReLU)
    assert "activation 2 (ReLU) removed" in rows[0]["args"] and "is kept" not in rows[0]["args"]
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        for model in (removed, kept):
            model[1].tau.fill_(-0.5)
        frn_out = removed[1](removed[0](x))
    torch.testing.assert_close(removed(x), removed[3](frn_out))
    torch.testing.assert_close(kept(x), kept[3](frn_out.clamp_min(0)))
    assert (frn_out < 0).any()  # the two differ
    replayed = _conv_bn_relu()
    apply_spec(replayed, get_spec(removed))  # a checkpoint's spec removes it again
    assert isinstance(replayed[2], nn.Identity)


def test_remove_following_activation_refuses_a_shared_or_missing_activation() -> None:
    class SharedRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x))) + self.relu(x)

    example = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"'bn': the activation 'relu' after it runs 2 times \(it is shared\)"):
        inject(SharedRelu(), method="frn", remove_following_activation=True, example_input=example)
    without = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"'1': no activation module .* reads its output directly"):
        inject(without, method="frn", remove_following_activation=True, example_input=example)
    with pytest.raises(ValueError, match=r"remove_following_activation finds .* give an example input"):
        inject(_conv_bn_relu(), method="frn", remove_following_activation=True)
    with pytest.warns(UserWarning, match="no replaced layer applies an activation of its own"):
        inject(
            _conv_bn_relu(),
            method="gn",
            num_groups=2,
            remove_following_activation=True,
            example_input=torch.zeros(1, 3, 4, 4),
        )


@pytest.mark.parametrize(
    ("args", "layer_type", "relus"),
    [
        (["--norm.method=frn"], "FilterResponseNorm", 4),
        (["--norm.method=frn", "--norm.remove_following_activation=true"], "FilterResponseNorm", 0),
        (["--norm.method=timm/evonorms0"], "EvoNorm2dS0", 4),
    ],
    ids=["frn", "frn-tlu-replaces-relu", "timm-evonorms0"],
)
def test_quickstart_fits_with_the_method(run_dir, request, args, layer_type, relus) -> None:
    """`normlightning fit --config configs/quickstart.yaml --norm.method <method>` (fast_dev_run,
    run inside the test's folder)."""
    if layer_type.startswith("EvoNorm"):
        pytest.importorskip("timm")
    config = str(request.config.rootpath / "configs/quickstart.yaml")
    root = f"--trainer.default_root_dir={run_dir}"
    cli = build_cli(["fit", "--config", config, *args, root, *QUIET])
    assert cli.trainer.state.finished
    types = [type(m).__name__ for m in cli.model.modules()]
    assert types.count(layer_type) == 4 and "BatchNorm2d" not in types and types.count("ReLU") == relus
