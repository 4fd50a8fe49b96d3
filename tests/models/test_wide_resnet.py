"""WideResNet: parameter counts from the architecture formula, shapes, bad depth."""

import pytest
import torch

from normlightning.models.wide_resnet import WideResNet, wide_resnet


def wrn_param_count(depth: int, k: int, num_classes: int, in_channels: int = 3) -> int:
    """Zagoruyko & Komodakis WRN-d-k parameter count written out layer by layer.

    stem conv3x3 (no bias): 9 * C_in * 16
    per block (in -> out): BN(in) 2*in + conv3x3 9*in*out + BN(out) 2*out + conv3x3 9*out*out
                           + 1x1 shortcut in*out when in != out (first block of a group)
    head: BN(64k) 2*64k + Linear 64k*classes + classes
    """
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 9 * in_channels * 16
    for g in range(3):
        c_in, c_out = widths[g], widths[g + 1]
        for b in range(n):
            i = c_in if b == 0 else c_out
            total += 2 * i + 9 * i * c_out + 2 * c_out + 9 * c_out * c_out
            if i != c_out:
                total += i * c_out
    total += 2 * widths[3] + widths[3] * num_classes + num_classes
    return total


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_wrn_10_2_param_count():
    model = wide_resnet(10, (3, 32, 32), depth=10, widen_factor=2)
    # WRN-10-2: n=1, widths 16/32/64/128 -> every block has a shortcut conv.
    hand = (
        9 * 3 * 16  # stem
        + (2 * 16 + 9 * 16 * 32 + 2 * 32 + 9 * 32 * 32 + 16 * 32)  # group 1
        + (2 * 32 + 9 * 32 * 64 + 2 * 64 + 9 * 64 * 64 + 32 * 64)  # group 2
        + (2 * 64 + 9 * 64 * 128 + 2 * 128 + 9 * 128 * 128 + 64 * 128)  # group 3
        + 2 * 128
        + 128 * 10
        + 10  # head
    )
    assert hand == wrn_param_count(10, 2, 10) == 303_706
    assert n_params(model) == hand


@pytest.mark.parametrize("depth,k", [(28, 10), (34, 10)])
def test_wrn_large_param_count(depth, k):
    model = WideResNet(depth, k, num_classes=10)
    assert n_params(model) == wrn_param_count(depth, k, 10)


def test_wrn_28_10_matches_published_count():
    # Sizes quoted for CIFAR-10: WRN-28-10 36.5M (36,479,194), WRN-34-10 46.2M, WRN-16-8 11.0M.
    assert wrn_param_count(28, 10, 10) == 36_479_194
    assert round(wrn_param_count(34, 10, 10) / 1e6, 1) == 46.2
    assert round(wrn_param_count(16, 8, 10) / 1e6, 1) == 11.0


def test_wrn_output_shapes_and_features():
    model = wide_resnet(7, (1, 20, 20), depth=16, widen_factor=1, dropout=0.3)
    x = torch.randn(2, 1, 20, 20)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, 64)
    model.eval()
    # one example in eval mode (running stats) also works
    assert model(x[:1]).shape == (1, 7)


def test_wrn_downsampling():
    model = WideResNet(10, 1, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    out = model.block3(model.block2(model.block1(model.conv1(x))))
    assert out.shape == (2, 64, 8, 8)


@pytest.mark.parametrize("depth", [11, 12, 4, 0])
def test_wrn_bad_depth(depth):
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth, 2, num_classes=10)
