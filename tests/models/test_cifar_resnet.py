"""The 6n+2 CIFAR ResNet: stage shapes, depth count, registry name and injectability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.injection import inject
from normlightning.models import available_backbones, build_backbone
from normlightning.norms.batch_group_norm import BatchGroupNorm


def _stage_outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Size], torch.Tensor]:
    shapes = []
    handles = [
        getattr(model, f"layer{i}").register_forward_hook(lambda m, i, o: shapes.append(o.shape)) for i in (1, 2, 3)
    ]
    logits = model(x)
    for h in handles:
        h.remove()
    return shapes, logits


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_stage_shapes_and_depth(depth):
    model = build_backbone("cifar_resnet", 10, (1, 28, 28), depth=depth, base_width=8)
    shapes, logits = _stage_outputs(model, torch.rand(2, 1, 28, 28))
    assert shapes == [torch.Size([2, 8, 28, 28]), torch.Size([2, 16, 14, 14]), torch.Size([2, 32, 7, 7])]
    assert logits.shape == (2, 10)
    # depth counts the stem, the 3x3 convolutions of the blocks and the linear head (not the 1x1 shortcuts)
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) + 1 == depth
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == (depth - 2) // 6


def test_he_resnet20_size_and_32px_input():
    model = build_backbone("cifar_resnet", 10, (3, 32, 32))  # depth 20, width 16: He et al.'s ResNet-20
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.03)
    shapes, _ = _stage_outputs(model, torch.rand(2, 3, 32, 32))
    assert shapes[-1] == torch.Size([2, 64, 8, 8])


def test_registered_and_injectable():
    assert "cifar_resnet" in available_backbones()
    model = build_backbone("cifar_resnet", 10, (1, 28, 28), depth=8, base_width=8)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn == 9  # stem, 2 per block, 2 projection shortcuts
    spec, _ = inject(model, method="bgn", num_groups="auto", batch_size=64, example_input=torch.zeros(2, 1, 28, 28))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, BatchGroupNorm) for m in model.modules()) == n_bn == len(spec["layers"])
    model.train()
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_bad_depth_and_width():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_backbone("cifar_resnet", 10, (1, 28, 28), depth=10)
    with pytest.raises(ValueError, match="base_width"):
        build_backbone("cifar_resnet", 10, (1, 28, 28), base_width=0)
    with pytest.raises(ValueError, match="H, W >= 4"):
        build_backbone("cifar_resnet", 10, (1, 2, 2))
