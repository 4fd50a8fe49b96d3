"""Bug hunt of the small-batch study (docs/reproduction.md): BGN inside real SGD steps on the
study's backbone (ResNet-8, width 8, 1x28x28) against an independent, written-out BGN.

The reference is plain autograd on the paper's eqs. (8)-(9): flatten ``(C, H, W)`` to ``D``,
cut it into ``G`` contiguous groups, mean and biased variance over ``(N, D/G)``, per-channel
affine; running statistics ``r <- (1 - m) r + m b`` with the variance ``* n / (n - 1)``,
``n = N * D / G``. Both models start from the same weights and see the same batches; after
every step the loss, every parameter gradient, every parameter and every running statistic
must agree, and so must the eval-mode outputs at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlightning.injection import inject
from normlightning.models import build_backbone
from normlightning.norms.batch_group_norm import BatchGroupNorm


class ReferenceBGN(nn.Module):
    """Written-out BGN (no normlightning code): groups of the flattened ``D = C*H*W``."""

    def __init__(self, layer: BatchGroupNorm) -> None:
        super().__init__()
        self.groups, self.eps, self.momentum = layer.num_groups, layer.eps, layer.momentum
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("running_mean", layer.running_mean.detach().clone())
        self.register_buffer("running_var", layer.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        v = x.reshape(n, self.groups, -1)
        if self.training:
            mean = v.mean(dim=(0, 2))
            var = ((v - mean[None, :, None]) ** 2).mean(dim=(0, 2))
            count = n * v.shape[2]
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / (count - 1))
        else:
            mean, var = self.running_mean, self.running_var
        xhat = ((v - mean[None, :, None]) / torch.sqrt(var[None, :, None] + self.eps)).reshape(x.shape)
        return xhat * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def _study_model(num_groups: int | str, batch_size: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = build_backbone("cifar_resnet", 10, (1, 28, 28), depth=8, base_width=8).double()
    spec, _ = inject(
        model,
        method="bgn",
        num_groups=num_groups,
        batch_size=batch_size,
        group_fit="nearest",
        example_input=torch.zeros(2, 1, 28, 28, dtype=torch.float64),
    )
    return model, spec


def _with_reference_layers(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, BatchGroupNorm):
            parent_name, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent_name) if parent_name else reference, child, ReferenceBGN(layer))
    assert not any(isinstance(m, BatchGroupNorm) for m in reference.modules())
    return reference


def test_auto_groups_per_layer_at_batch_2_and_64():
    """The paper's mapping fitted to each layer: G = 1 everywhere at batch 2; 256 -> 224 at batch 64
    (224 is the largest divisor <= 256 of every D here: 8*784, 16*196, 32*49)."""
    _, spec = _study_model("auto", 2)
    assert [r["kwargs"]["num_groups"] for r in spec["layers"]] == [1] * 9
    _, spec = _study_model("auto", 64)
    assert [r["kwargs"]["num_groups"] for r in spec["layers"]] == [224] * 9


@pytest.mark.parametrize("num_groups", [1, 4, 224])
def test_bgn_sgd_steps_match_reference(num_groups):
    """G = 1 (the batch-2 choice, one set per layer), 4 (groups of several channels) and 224 (the
    batch-64 choice, groups inside a channel), trained at per-process batch 2."""
    model, _ = _study_model(num_groups, 2)
    reference = _with_reference_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    model.train()
    reference.train()
    for _ in range(4):
        x = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (2,), generator=gen)
        losses = []
        for net, optimizer in ((model, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
        grads = {n: p.grad for n, p in model.named_parameters()}
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-7, atol=1e-10, msg=f"gradient of {name}")
        opt.step()
        ref_opt.step()
    params = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-7, atol=1e-10, msg=f"parameter {name}")
    buffers = dict(model.named_buffers())
    for name, b in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b, rtol=1e-7, atol=1e-10, msg=f"buffer {name}")
    model.eval()
    reference.eval()
    x = torch.rand(8, 1, 28, 28, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-7, atol=1e-10)
