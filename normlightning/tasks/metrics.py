"""Accuracy metrics of the classification tasks (``ClassificationTask``, ``AdversarialTask``):
one builder, so that every task names and computes its top-k accuracies the same way."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["accuracy_metrics"]


def accuracy_metrics(num_classes: int, *, prefix: str = "", postfix: str = "") -> MetricCollection:
    """``{prefix}acc1{postfix}`` and, when ``num_classes >= 5``, ``{prefix}acc5{postfix}``.

    ``acc{k}`` is the micro-averaged top-k accuracy: the fraction of examples whose target is
    among the ``k`` largest logits (torchmetrics ``MulticlassAccuracy``, epoch-level, synchronized
    across processes). Input: logits ``(N, num_classes)`` and targets ``(N,)``.
    """
    metrics = {"acc1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix or None, postfix=postfix or None)
