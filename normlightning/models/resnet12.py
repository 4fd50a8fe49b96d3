"""ResNet-12 for few-shot learning in two variants (``resnet12(..., variant=...)``):

* ``metaoptnet`` (Lee et al., CVPR 2019; the default): widths 64-160-320-640, LeakyReLU(0.1),
  dropout in blocks 1-2 and DropBlock in blocks 3-4 (layout below).
* ``tadam`` (Oreshkin, Rodríguez López & Lacoste, NeurIPS 2018, the backbone the BGN paper cites for
  its few-shot experiment): widths 64-128-256-512, swish-1 (``x * sigmoid(x)``), no dropout and no
  DropBlock; the same block otherwise (three conv3x3-BN, a conv1x1-BN projection shortcut, 2x2 max-pool)
  and a global average pool to 512-d. The order "sum, activation, max-pool" is the one of this module's
  block (the TADAM descriptions available to us do not fix it; with swish, which is not monotonic, pooling
  first would differ).

MetaOptNet layout for an 84x84 input::

    block 1: C_in -> 64,  84 -> 42      dropout(drop_rate)
    block 2: 64   -> 160, 42 -> 21      dropout(drop_rate)
    block 3: 160  -> 320, 21 -> 10      DropBlock(drop_rate, block_size=5)
    block 4: 320  -> 640, 10 -> 5       DropBlock(drop_rate, block_size=5)
    global average pool -> (N, 640)

Each block: ``(conv3x3-BN-act) x 2 -> conv3x3-BN``, plus a ``conv1x1-BN``
shortcut, sum, act, 2x2 max-pool (stride 2), then the drop layer (act: LeakyReLU(0.1) or swish-1).
Convolutions have no bias; norm layers are ``nn.BatchNorm2d`` so the injection callback can
swap them. Differences from MetaOptNet's code: the features are average pooled to 640-d
(MetaOptNet's miniImageNet model flattens 640x5x5), and the DropBlock schedule counter is a
registered buffer that only advances in training mode (MetaOptNet keeps a Python attribute
that also advances in evaluation and is lost on resume).

DropBlock (Ghiasi et al., NeurIPS 2018) with MetaOptNet's linear schedule: at training step
``t`` the drop probability is ``p_t = drop_rate * min(1, t / schedule_steps)`` (MetaOptNet:
``schedule_steps = 20 * 2000``), and the seed rate is
``gamma = p_t / block_size^2 * H W / ((H - block_size + 1)(W - block_size + 1))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlightning.models.cosine_classifier import CosineClassifier

__all__ = ["RESNET12_VARIANTS", "DropBlock", "ResNet12", "ResNet12Block", "ResNet12Classifier", "resnet12"]

#: activation name -> module factory (``swish`` is swish-1, ``x * sigmoid(x)`` = ``nn.SiLU``)
ACTIVATIONS = {"leaky_relu": lambda: nn.LeakyReLU(0.1), "swish": nn.SiLU}

#: variant name -> the ResNet12 arguments it sets (see the module docstring)
RESNET12_VARIANTS: dict[str, dict] = {
    "metaoptnet": {"widths": (64, 160, 320, 640), "drop_rate": 0.1, "activation": "leaky_relu"},
    "tadam": {"widths": (64, 128, 256, 512), "drop_rate": 0.0, "activation": "swish"},
}


class DropBlock(nn.Module):
    """DropBlock with a linearly increasing drop rate.

    Args:
        drop_rate: final drop probability ``p`` (``1 - keep_prob``).
        block_size: side of the square blocks that are dropped (odd; MetaOptNet uses 5).
        schedule_steps: number of training forwards over which ``p`` ramps from 0 to
            ``drop_rate`` (0 means the full rate from the start).

    The step counter ``num_steps`` is a registered buffer (saved in ``state_dict``, broadcast
    by DDP, restored on resume) and is incremented once per forward in training mode only.
    In evaluation mode the layer is the identity.

    Shape: ``(N, C, H, W) -> (N, C, H, W)``. The kept activations are rescaled by
    ``numel(mask) / sum(mask)`` so the expected activation is unchanged.
    """

    def __init__(self, drop_rate: float = 0.1, block_size: int = 5, schedule_steps: int = 40000) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DropBlock drop_rate must be in [0, 1), got {drop_rate}.")
        if block_size < 1 or block_size % 2 == 0:
            raise ValueError(f"DropBlock block_size must be a positive odd integer, got {block_size}.")
        if schedule_steps < 0:
            raise ValueError(f"DropBlock schedule_steps must be >= 0, got {schedule_steps}.")
        self.drop_rate = float(drop_rate)
        self.block_size = int(block_size)
        self.schedule_steps = int(schedule_steps)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def current_drop_rate(self) -> float:
        """``drop_rate * min(1, num_steps / schedule_steps)``."""
        if self.schedule_steps == 0:
            return self.drop_rate
        return self.drop_rate * min(1.0, float(self.num_steps) / self.schedule_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        p = self.current_drop_rate()
        self.num_steps += 1
        if p <= 0.0:
            return x
        n, c, h, w = x.shape
        bs = min(self.block_size, h, w)
        if bs % 2 == 0:
            bs -= 1
        valid_h, valid_w = h - bs + 1, w - bs + 1
        gamma = p / bs**2 * (h * w) / (valid_h * valid_w)
        seeds = torch.bernoulli(torch.full((n, c, valid_h, valid_w), min(gamma, 1.0), device=x.device, dtype=x.dtype))
        half = bs // 2
        seeds = F.pad(seeds, (half, half, half, half))
        keep = 1.0 - F.max_pool2d(seeds, kernel_size=bs, stride=1, padding=half)
        kept = keep.sum().clamp_min(1.0)
        return x * keep * (keep.numel() / kept)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}, schedule_steps={self.schedule_steps}"


class ResNet12Block(nn.Module):
    """One ResNet-12 stage (see the module docstring).

    Shape: ``(N, in_planes, H, W) -> (N, planes, floor(H/2), floor(W/2))``.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        drop_rate: float = 0.0,
        drop_block: bool = False,
        block_size: int = 5,
        schedule_steps: int = 40000,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.act = ACTIVATIONS[activation]()
        self.pool = nn.MaxPool2d(2)
        if drop_block and drop_rate > 0:
            self.drop: nn.Module = DropBlock(drop_rate, block_size, schedule_steps)
        elif drop_rate > 0:
            self.drop = nn.Dropout(drop_rate)
        else:
            self.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.drop(self.pool(out))


class ResNet12(nn.Module):
    """ResNet-12 encoder: ``(N, in_channels, H, W) -> (N, widths[-1])`` (640 by default).

    Args:
        in_channels: input channels.
        widths: the four stage widths (MetaOptNet: 64, 160, 320, 640).
        drop_rate: dropout probability in blocks 1-2 and final DropBlock rate in blocks 3-4
            (MetaOptNet: 0.1). 0 disables both.
        dropblock_size: DropBlock block size (MetaOptNet: 5).
        dropblock_schedule_steps: training forwards over which the DropBlock rate ramps up
            (MetaOptNet: 20 * 2000 = 40000).
        activation: ``leaky_relu`` (LeakyReLU(0.1), MetaOptNet) or ``swish`` (swish-1, TADAM).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.1,
        dropblock_size: int = 5,
        dropblock_schedule_steps: int = 40000,
        activation: str = "leaky_relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ResNet12 activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        if len(widths) != 4:
            raise ValueError(f"ResNet12 needs exactly 4 widths, got {tuple(widths)!r}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"ResNet12 drop_rate must be in [0, 1), got {drop_rate}.")
        chans = [in_channels, *widths]
        self.layers = nn.Sequential(
            *[
                ResNet12Block(
                    chans[i],
                    chans[i + 1],
                    drop_rate=drop_rate,
                    drop_block=i >= 2,
                    block_size=dropblock_size,
                    schedule_steps=dropblock_schedule_steps,
                    activation=activation,
                )
                for i in range(4)
            ]
        )
        self.num_features = int(widths[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init for the activation (swish: ReLU's gain, as TADAM states no init)
                slope = 0.1 if activation == "leaky_relu" else 0.0
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=slope)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1)


class ResNet12Classifier(nn.Module):
    """``encoder`` (ResNet12) followed by ``classifier`` (CosineClassifier).

    ``forward(x)`` returns logits ``(N, num_classes)``; ``features(x)`` the ``(N, 640)``
    embedding used for imprinting.
    """

    def __init__(self, encoder: ResNet12, classifier: CosineClassifier) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def resnet12(
    num_classes: int,
    input_shape: Sequence[int] = (3, 84, 84),
    scale: float = 10.0,
    learn_scale: bool = True,
    variant: str = "metaoptnet",
    **kwargs,
) -> ResNet12Classifier:
    """Backbone factory: ResNet-12 encoder + cosine classifier over ``num_classes`` base classes.

    Args:
        num_classes: number of base classes.
        input_shape: ``(C, H, W)``; only ``C`` matters.
        scale, learn_scale: the cosine classifier's temperature and whether it is learned.
        variant: ``metaoptnet`` or ``tadam`` (:data:`RESNET12_VARIANTS`): sets ``widths``, ``drop_rate`` and
            ``activation``; any of them given in ``kwargs`` overrides the variant's value.
        **kwargs: forwarded to :class:`ResNet12` (``widths``, ``drop_rate``, ``dropblock_size``,
            ``dropblock_schedule_steps``, ``activation``).
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)!r}.")
    if variant not in RESNET12_VARIANTS:
        raise ValueError(f"resnet12 variant must be one of {sorted(RESNET12_VARIANTS)}, got {variant!r}.")
    encoder = ResNet12(in_channels=int(input_shape[0]), **{**RESNET12_VARIANTS[variant], **kwargs})
    return ResNet12Classifier(encoder, CosineClassifier(encoder.num_features, num_classes, scale, learn_scale))
