"""The fully connected network of the HN paper's analysis (Heterologous Normalization, §4.6).

"A four-layer fully-connected network on MNIST. Each FC layer has 128 neurons, BN and ReLU
are used after the FC layer." Here: the input ``(N, C, H, W)`` is flattened to
``(N, C*H*W)``, then ``depth`` hidden layers ``Linear(-> width) - BatchNorm1d(width) - ReLU``
and a linear classifier ``Linear(width -> num_classes)``. Hidden layer ``i`` (0-based) is
``layers[i]`` with children ``fc``, ``bn``, ``relu``, so the statistics of "neuron i-j" of
the paper are those of ``layers[i-1].bn`` channel ``j``.

The normalization layers are ``nn.BatchNorm1d`` on ``(N, width)`` (swappable by the norm
injection; replacements must accept ``(N, C)`` inputs).
"""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLPLayer(nn.Module):
    """``relu(bn(fc(x)))`` for ``x`` of shape ``(N, in_features)`` -> ``(N, out_features)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.fc(x)))


class MLP(nn.Module):
    """Flatten, ``depth`` x (Linear - BatchNorm1d - ReLU) of ``width`` units, linear classifier.

    Args:
        in_features: ``C * H * W`` of the input.
        num_classes: number of logits.
        depth: number of hidden layers (4 in the paper).
        width: units per hidden layer (128 in the paper).
    """

    def __init__(self, in_features: int, num_classes: int, depth: int = 4, width: int = 128) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"mlp: depth and width must be >= 1, got depth={depth}, width={width}")
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*[MLPLayer(in_features if i == 0 else width, width) for i in range(depth)])
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, *input_shape)`` -> logits ``(N, num_classes)``."""
        return self.classifier(self.layers(self.flatten(x)))


def mlp(num_classes: int, input_shape: tuple[int, int, int], depth: int = 4, width: int = 128) -> MLP:
    """Registry factory for :class:`MLP` (defaults: the paper's 4 layers of 128 units)."""
    return MLP(math.prod(input_shape), num_classes, depth=depth, width=width)
