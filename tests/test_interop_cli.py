"""Interop through the command and the Python API: timm backbones with the ``norm:`` injection, the
pretrained fine-tune config (weights file made here, in a temporary torch hub cache), and
``examples/python_api.py``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from normlightning.callbacks import NormInjection, Recalibration
from normlightning.cli import build_cli
from normlightning.models import build_backbone
from normlightning.norms import BatchGroupNorm, BatchNorm, GroupNorm, NormWithCarried
from normlightning.tasks import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "examples" / "configs" / "finetune_resnet18_bgn.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYNTHETIC = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[3, 32, 32]",
    "--data.num_classes=4",
    "--data.num_train=8",
    "--data.num_val=8",
    "--data.num_test=8",
    "--data.batch_size=8",
]
NATIVE_NORMS = (nn.BatchNorm2d, timm.layers.BatchNormAct2d)
NEW_TYPE = {"bn": BatchNorm, "bgn": BatchGroupNorm, "gn": GroupNorm}


def _injection(cli) -> NormInjection:
    return next(c for c in cli.trainer.callbacks if isinstance(c, NormInjection))


@pytest.mark.parametrize("architecture", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize(
    "norm",
    [
        ["--norm.method=bn"],
        ["--norm.method=bgn", "--norm.num_groups=auto"],
        ["--norm.method=gn", "--norm.num_groups=8"],
    ],
    ids=["bn", "bgn", "gn"],
)
def test_timm_backbone_through_the_cli_with_the_norm_injection(run_dir, architecture, norm) -> None:
    """BN, BGN (``auto``: G = 16 for the batch of 8) and GN replace every norm layer of a timm ResNet
    and EfficientNet, keeping each BatchNormAct2d's activation; one training step runs."""
    method = norm[0].split("=")[1]
    cli = build_cli(
        [
            "fit",
            *SYNTHETIC,
            "--model=normlightning.tasks.ClassificationTask",
            f"--model.backbone=timm/{architecture}",
            *norm,
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            *QUIET,
        ]
    )
    assert cli.trainer.global_step == 1
    reference = build_backbone(f"timm/{architecture}", num_classes=4, input_shape=(3, 32, 32))
    native = {n: m for n, m in reference.named_modules() if isinstance(m, NATIVE_NORMS)}
    backbone = cli.model.backbone
    assert not any(isinstance(m, NATIVE_NORMS) for m in backbone.modules())
    for name, old in native.items():
        new = backbone.get_submodule(name)
        if isinstance(old, timm.layers.BatchNormAct2d):
            assert isinstance(new, NormWithCarried) and type(new.act) is type(old.act), name
            new = new.norm
        assert type(new) is NEW_TYPE[method], name
    rows = _injection(cli).summary_rows
    assert len(rows) == len(native)
    if method == "bgn":
        assert all("num_groups auto->16 (B=8)" in r["args"] for r in rows)


@pytest.fixture
def torch_hub_resnet18(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """A ResNet-18 state_dict (1000 classes, seeded) as the IMAGENET1K_V1 file of a temporary torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(7)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_finetune_config_swaps_the_norm_of_the_pretrained_model_and_recalibrates(
    run_dir, torch_hub_resnet18, write_image_folders
) -> None:
    """The config for a few steps: ResNet-18 from the hub-cache file, BN -> BGN with the pretrained
    gamma/beta, two fine-tuning steps, the recalibration pass; the checkpoint then loads without the file."""
    write_image_folders(run_dir / "my_data", per_class=4)
    cli = build_cli(
        [
            "--config",
            str(FINETUNE),
            "--data.image_size=32",
            "--data.batch_size=4",
            "--data.num_workers=0",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            *QUIET,
        ],
        run=False,
    )
    model = cli.model
    report = model.backbone_weights_report
    assert report.source == "ResNet18_Weights.IMAGENET1K_V1" and set(report.skipped) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.backbone.conv1.weight, torch_hub_resnet18["conv1.weight"])
    cli.trainer.fit(model, datamodule=cli.datamodule)

    assert cli.trainer.global_step == 2
    rows = _injection(cli).summary_rows
    assert len(rows) == 20 and all(r["new"] == "BatchGroupNorm (bgn)" for r in rows)
    assert all("num_groups auto->2 (B=4)" in r["args"] for r in rows)
    assert all("copied weight, bias, num_batches_tracked (pretrained)" in r["args"] for r in rows)
    recalibration = next(c for c in cli.trainer.callbacks if isinstance(c, Recalibration))
    assert recalibration.last_result["recalibration/num_batches"] == 3.0  # 12 images / batch 4: all of them
    checkpoint = next(run_dir.rglob("last.ckpt"))
    (Path(torch.hub.get_dir()) / "checkpoints" / "resnet18-f37072fd.pth").unlink()
    loaded = ClassificationTask.load_from_checkpoint(checkpoint)
    assert loaded.backbone_weights_report is None
    layers = [m for m in loaded.backbone.modules() if isinstance(m, BatchGroupNorm)]
    assert len(layers) == 20
    torch.testing.assert_close(loaded.backbone.bn1.running_var, model.backbone.bn1.running_var)


def test_python_api_example(run_dir, capsys) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        example = importlib.import_module("python_api")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    model = example.main(["--root", str(run_dir / "api"), "--max-epochs=1", "--limit-batches=2"])
    out = capsys.readouterr().out
    assert "injected 20 layers" in out and "val/acc1 = " in out
    assert isinstance(model, nn.Sequential) and not model.training
    assert sum(isinstance(m, BatchGroupNorm) for m in model.modules()) == 4  # small_cnn's four BatchNorm2d
    task = ClassificationTask.load_from_checkpoint(next((run_dir / "api").rglob("last.ckpt")))
    task.eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), task(x))
