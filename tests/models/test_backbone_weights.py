"""``backbone_weights``: pretrained starting points from local files (made here, never downloaded)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from normlightning.injection import inject
from normlightning.models.weights import load_backbone_weights
from normlightning.tasks import ClassificationTask

#: the file torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads (basename of its URL)
RESNET18_FILE = "resnet18-f37072fd.pth"


def pretrained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state with non-trivial BN statistics and affine parameters (seeded)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1000)
    return model.state_dict()


@pytest.fixture(scope="module")
def imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return pretrained_state(torchvision.models.resnet18(num_classes=1000))


def task(weights: str | Path | None, *, backbone: str = "resnet18", num_classes: int = 10, channels: int = 3):
    return ClassificationTask(
        backbone=backbone,
        num_classes=num_classes,
        input_shape=(channels, 32, 32),
        backbone_weights=None if weights is None else str(weights),
    )


def test_local_file_loads_every_tensor_and_reports_the_resized_head(tmp_path, imagenet_resnet18, caplog) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_resnet18, path)
    with caplog.at_level(logging.INFO):
        model = task(path)
    state = model.backbone.state_dict()
    convs = [k for k, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for name in convs:
        assert torch.equal(state[f"{name}.weight"], imagenet_resnet18[f"{name}.weight"]), name
    for key in ("bn1.running_mean", "bn1.running_var", "layer4.1.bn2.weight", "layer4.1.bn2.num_batches_tracked"):
        assert torch.equal(state[key], imagenet_resnet18[key]), key
    report = model.backbone_weights_report
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert "file (1000, 512), model (10, 512): classifier head for num_classes=10" in report.skipped["fc.weight"]
    assert len(report.loaded) == len(imagenet_resnet18) - 2
    assert "skipped fc.weight: file (1000, 512), model (10, 512)" in caplog.text
    assert "backbone_weights" not in model.hparams  # a checkpoint holds the weights; the file is not needed


def test_injection_summary_says_which_layers_start_from_pretrained_statistics(tmp_path, imagenet_resnet18) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_resnet18, path)
    model = task(path)
    _, rows = inject(model, method="bn", example_input=model.example_input_array)
    assert len(rows) == 20 and all("pretrained statistics" in r["args"] for r in rows)
    bn1 = model.backbone.bn1  # our BN kept the pretrained statistics
    assert torch.equal(bn1.running_var, imagenet_resnet18["bn1.running_var"])

    gn_model = task(path)
    _, rows = inject(gn_model, method="gn", num_groups=32, example_input=gn_model.example_input_array)
    assert all("copied weight, bias (pretrained)" in r["args"] and "statistics" not in r["args"] for r in rows)
    assert torch.equal(gn_model.backbone.bn1.weight, imagenet_resnet18["bn1.weight"])

    fresh = task(None)
    _, rows = inject(fresh, method="bn", example_input=fresh.example_input_array)
    assert not any("pretrained" in r["args"] for r in rows)


def test_torchvision_weights_name_reads_the_torch_hub_cache(tmp_path, imagenet_resnet18, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE
    with pytest.raises(FileNotFoundError, match=f"expected the file {expected}"):
        task("IMAGENET1K_V1")
    expected.parent.mkdir(parents=True)
    torch.save(imagenet_resnet18, expected)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model = task(name)
        assert model.backbone_weights_report.source == "ResNet18_Weights.IMAGENET1K_V1"
        assert torch.equal(model.backbone.conv1.weight, imagenet_resnet18["conv1.weight"])
    with pytest.raises(ValueError, match="valid: IMAGENET1K_V1"):
        task("IMAGENET1K_V9")
    with pytest.raises(ValueError, match="not a torchvision model"):
        task("IMAGENET1K_V1", backbone="small_cnn")


def test_timm_backbone_from_a_safetensors_file(tmp_path) -> None:
    """A timm backbone from the kind of local file ``pretrained_cfg_overlay=dict(file=...)`` names."""
    torch.manual_seed(2)
    state = pretrained_state(timm.create_model("resnet18", num_classes=1000))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = task(path, backbone="timm/resnet18", num_classes=4)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer3[0].bn2.running_var, state["layer3.0.bn2.running_var"])
    assert set(model.backbone_weights_report.skipped) == {"fc.weight", "fc.bias"}


def test_single_channel_input_skips_the_input_convolution(tmp_path, imagenet_resnet18) -> None:
    torch.save({"state_dict": imagenet_resnet18}, tmp_path / "wrapped.pt")
    model = task(tmp_path / "wrapped.pt", channels=1)
    assert "input convolution for 1 input channels" in model.backbone_weights_report.skipped["conv1.weight"]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, imagenet_resnet18["layer1.0.conv1.weight"])


def test_files_that_do_not_fit_are_clear_errors(tmp_path, imagenet_resnet18) -> None:
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="does not fit backbone 'resnet18'.*not in the model"):
        task(tmp_path / "resnet34.pth")
    partial = {k: v for k, v in imagenet_resnet18.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="missing from the file \\['layer4.0.conv1.weight'"):
        task(tmp_path / "partial.pth")
    wide = dict(imagenet_resnet18, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 5, 5)})
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match="shapes differ.*layer1.0.conv1.weight: file \\(64, 64, 5, 5\\)"):
        task(tmp_path / "wide.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task(tmp_path / "absent.pth")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        task(tmp_path / "list.pt")
    with pytest.raises(ValueError, match="give the path of a weights file"):
        task(tmp_path / "weights.npz")


def test_safetensors_without_the_package_says_how_to_install(tmp_path, monkeypatch) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_backbone_weights(nn.Linear(2, 2), tmp_path / "w.safetensors", backbone="mlp", num_classes=2)
