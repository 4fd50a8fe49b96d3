"""Accuracy metrics of the classification tasks (``ClassificationTask``, ``AdversarialTask``):
one builder, so that every task names and computes its top-k accuracies the same way."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch import LightningModule
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["accuracy_metrics", "log_epoch_metrics"]


def accuracy_metrics(num_classes: int, *, prefix: str = "", postfix: str = "") -> MetricCollection:
    """``{prefix}acc1{postfix}`` and, when ``num_classes >= 5``, ``{prefix}acc5{postfix}``.

    ``acc{k}`` is the micro-averaged top-k accuracy: the fraction of examples whose target is
    among the ``k`` largest logits (torchmetrics ``MulticlassAccuracy``, epoch-level, synchronized
    across processes). Input: logits ``(N, num_classes)`` and targets ``(N,)``. The inputs are not
    validated again on every update (``validate_args=False``): the tasks compute the cross-entropy
    of the same logits and targets first, which rejects bad targets.
    """
    metrics = {"acc1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro", validate_args=False)}
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro", validate_args=False)
    return MetricCollection(metrics, prefix=prefix or None, postfix=postfix or None)


def log_epoch_metrics(module: LightningModule, collections: Iterable[MetricCollection], *, prog_bar: bool) -> None:
    """At an epoch end: log each collection's ``compute()`` and reset it (a collection that no
    step updated this epoch is only reset).

    The tasks ``update`` their metrics in every step and log the values here, once per epoch:
    logging the metric objects in every step costs Lightning more per step than a small model's
    whole training step (benchmarks/lightning_overhead.py). ``compute()`` synchronizes across
    processes (torchmetrics); ``sync_dist`` then averages identical values and keeps Lightning
    from warning about epoch-level values under DDP.
    """
    for metrics in collections:
        if any(metric.update_called for metric in metrics.values()):
            module.log_dict(metrics.compute(), prog_bar=prog_bar, sync_dist=True)
        metrics.reset()
