"""ResNet-12 (MetaOptNet): shapes, DropBlock schedule buffer."""

import torch

from normlightning.models.cosine_classifier import CosineClassifier
from normlightning.models.resnet12 import DropBlock, ResNet12, resnet12


def test_resnet12_feature_shape_84():
    model = resnet12(5, (3, 84, 84))
    assert isinstance(model.classifier, CosineClassifier)
    x = torch.randn(2, 3, 84, 84)
    feats = model.features(x)
    assert feats.shape == (2, 640)
    assert model(x).shape == (2, 5)
    # 84 -> 42 -> 21 -> 10 -> 5 before pooling
    assert model.encoder.layers(x).shape == (2, 640, 5, 5)


def test_resnet12_structure_and_bn():
    enc = ResNet12()
    drops = [blk.drop for blk in enc.layers]
    assert isinstance(drops[0], torch.nn.Dropout) and isinstance(drops[1], torch.nn.Dropout)
    assert isinstance(drops[2], DropBlock) and isinstance(drops[3], DropBlock)
    assert drops[3].block_size == 5
    assert [blk.conv1.out_channels for blk in enc.layers] == [64, 160, 320, 640]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()) == 16  # 4 blocks x (3 + shortcut)
    assert sum(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1 for m in enc.modules()) == 4


def test_dropblock_counter_buffer():
    enc = ResNet12(in_channels=1, widths=(4, 4, 4, 4), dropblock_schedule_steps=10)
    keys = [k for k in enc.state_dict() if k.endswith("num_steps")]
    assert keys == ["layers.2.drop.num_steps", "layers.3.drop.num_steps"]
    x = torch.randn(2, 1, 16, 16)
    enc.train()
    enc(x)
    enc(x)
    assert int(enc.layers[3].drop.num_steps) == 2
    enc.eval()
    y1, y2 = enc(x), enc(x)
    assert int(enc.layers[3].drop.num_steps) == 2  # eval does not advance
    torch.testing.assert_close(y1, y2)
    # survives a state_dict round trip
    other = ResNet12(in_channels=1, widths=(4, 4, 4, 4), dropblock_schedule_steps=10)
    other.load_state_dict(enc.state_dict())
    assert int(other.layers[2].drop.num_steps) == 2


def test_dropblock_schedule_and_mask():
    torch.manual_seed(0)
    db = DropBlock(drop_rate=0.2, block_size=3, schedule_steps=4)
    x = torch.ones(4, 8, 9, 9)
    assert db.current_drop_rate() == 0.0
    torch.testing.assert_close(db(x), x)  # rate 0 at step 0
    db.num_steps.fill_(2)
    assert abs(db.current_drop_rate() - 0.1) < 1e-12
    db.num_steps.fill_(100)
    assert db.current_drop_rate() == 0.2
    out = db(x)
    zero_frac = float((out == 0).float().mean())
    assert 0.05 < zero_frac < 0.4
    # rescaling keeps the mean of a constant input
    assert abs(float(out.mean()) - 1.0) < 1e-5


def test_resnet12_tadam_variant():
    """TADAM's ResNet-12 (Oreshkin et al. 2018): widths 64-128-256-512, swish-1, no dropout and no DropBlock; a block
    is maxpool2(swish(bn3(conv3(swish(bn2(conv2(swish(bn1(conv1 x)))))))) + bn(conv1x1 x))), written out here."""
    import pytest
    import torch.nn.functional as F

    model = resnet12(5, (3, 84, 84), variant="tadam")
    enc = model.encoder
    assert [blk.conv1.out_channels for blk in enc.layers] == [64, 128, 256, 512]
    assert not any(isinstance(m, (DropBlock, torch.nn.Dropout, torch.nn.LeakyReLU)) for m in enc.modules())
    assert model.features(torch.randn(2, 3, 84, 84)).shape == (2, 512)
    small = resnet12(4, (3, 16, 16), variant="tadam", widths=(4, 4, 4, 8)).encoder.eval()  # kwargs override
    assert small.num_features == 8
    block, x = small.layers[0], torch.randn(2, 3, 16, 16)

    def bn(layer, t):
        return F.batch_norm(t, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)

    def swish(t):
        return t * torch.sigmoid(t)

    out = swish(bn(block.bn1, F.conv2d(x, block.conv1.weight, padding=1)))
    out = swish(bn(block.bn2, F.conv2d(out, block.conv2.weight, padding=1)))
    out = bn(block.bn3, F.conv2d(out, block.conv3.weight, padding=1))
    out = out + bn(block.shortcut[1], F.conv2d(x, block.shortcut[0].weight))
    torch.testing.assert_close(block(x), F.max_pool2d(swish(out), 2))
    with pytest.raises(ValueError, match="variant"):
        resnet12(5, variant="wide")
    with pytest.raises(ValueError, match="activation"):
        ResNet12(activation="relu6")
