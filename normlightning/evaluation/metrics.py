"""Accuracy metrics of the classification tasks (``ClassificationTask``, ``AdversarialTask``):
one builder, so that every task names and computes its top-k accuracies the same way."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = ["TopKAccuracy", "accuracy_metrics"]


class TopKAccuracy(Metric):
    """Top-``k`` accuracy: the fraction of examples whose target is among the ``k`` largest logits
    (micro average over all examples; ties broken as ``torch.topk`` breaks them).

    State: ``correct`` and ``total`` counts (summed across processes). Update with logits
    ``(N, num_classes)`` and integer targets ``(N,)``. A few tensor ops per update: torchmetrics'
    ``MulticlassAccuracy`` computes per-class statistics instead, about ten times the cost,
    which a small model's training step notices.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopKAccuracy: k must be a positive int, got {k!r}")
        self.k = k
        self.add_state("correct", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        if self.k == 1:
            hits = logits.argmax(dim=1) == target
        else:
            hits = (logits.topk(self.k, dim=1).indices == target.unsqueeze(1)).any(dim=1)
        # out of place: after a reset in inference mode (Lightning's evaluation) the states are
        # inference tensors, which may not be updated in place outside it
        self.correct = self.correct + hits.sum()
        self.total = self.total + target.numel()

    def compute(self) -> Tensor:
        return self.correct.float() / self.total


def accuracy_metrics(num_classes: int, *, prefix: str = "", postfix: str = "") -> MetricCollection:
    """``{prefix}acc1{postfix}`` and, when ``num_classes >= 5``, ``{prefix}acc5{postfix}``
    (:class:`TopKAccuracy`, epoch-level, synchronized across processes). Input: logits
    ``(N, num_classes)`` and targets ``(N,)``.
    """
    metrics = {"acc1": TopKAccuracy(1)}
    if num_classes >= 5:
        metrics["acc5"] = TopKAccuracy(5)
    return MetricCollection(metrics, prefix=prefix or None, postfix=postfix or None, compute_groups=False)
