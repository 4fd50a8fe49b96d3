"""Cosine-similarity classifier and weight imprinting.

- ``cosine_logits(x, W, s) = s * normalize(x) @ normalize(W)^T`` (Gidaris & Komodakis 2018;
  Qi, Brown & Lowe 2018), rows L2-normalized.
- ``imprint_weights``: the imprinted weight of class ``c`` is
  ``normalize(mean_{i: y_i = c} normalize(f_i))`` (Qi, Brown & Lowe 2018, eq. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosineClassifier", "cosine_logits", "imprint_weights"]


def cosine_logits(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Scaled cosine similarities.

    Args:
        x: features ``(N, D)``.
        weight: class weights ``(K, D)``.
        scale: scalar temperature ``s``.

    Returns:
        ``(N, K)`` logits ``s * <x_n / |x_n|, w_k / |w_k|>``.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"cosine_logits expects x (N, D) and weight (K, D) with the same D, "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}."
        )
    return scale * (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t())


class CosineClassifier(nn.Module):
    """``logits = scale * normalize(x) @ normalize(W)^T``.

    Args:
        in_features: embedding size ``D``.
        num_classes: number of classes ``K``; ``weight`` has shape ``(K, D)``.
        scale: initial value of the temperature ``s`` (10 as in Gidaris & Komodakis 2018).
        learn_scale: whether ``s`` is a learnable parameter (else a buffer).

    Shape: ``(N, D) -> (N, K)``.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0, learn_scale: bool = True) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(
                f"CosineClassifier needs in_features >= 1 and num_classes >= 1, got {in_features}, {num_classes}."
            )
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        scale_t = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(scale_t)
        else:
            self.register_buffer("scale", scale_t)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=(2.0 / self.in_features) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, scale={float(self.scale):.3g}"


def imprint_weights(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Imprinted class weights (Qi, Brown & Lowe 2018).

    Args:
        features: embeddings ``(N, D)``.
        labels: integer labels ``(N,)`` in ``0 .. num_classes - 1``; every class must occur.
        num_classes: ``K``.

    Returns:
        ``(K, D)``: row ``c`` is ``normalize(mean_{i: labels_i = c} normalize(features_i))``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}.")
    labels = torch.as_tensor(labels, device=features.device)
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must be (N,) matching features (N, D); got {tuple(labels.shape)} for {tuple(features.shape)}."
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got range {int(labels.min())}..{int(labels.max())}."
        )
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"imprint_weights: classes {missing} have no examples; every class needs at least one.")
    normed = F.normalize(features, dim=1)
    sums = torch.zeros(num_classes, features.shape[1], dtype=normed.dtype, device=normed.device)
    sums.index_add_(0, labels, normed)
    means = sums / counts.unsqueeze(1).to(normed.dtype)
    return F.normalize(means, dim=1)
