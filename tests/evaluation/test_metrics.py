"""The tasks' top-k accuracy against torchmetrics' MulticlassAccuracy and a count by hand."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from normlightning.evaluation.metrics import TopKAccuracy, accuracy_metrics


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_accuracy_matches_torchmetrics_and_hand_count(k) -> None:
    torch.manual_seed(0)
    ours, reference = TopKAccuracy(k), MulticlassAccuracy(num_classes=7, top_k=k, average="micro")
    hits = total = 0
    for n in (5, 1, 12):
        logits, target = torch.randn(n, 7), torch.randint(0, 7, (n,))
        ours.update(logits, target)
        reference.update(logits, target)
        order = logits.argsort(dim=1, descending=True)
        hits += sum(int(target[i] in order[i, :k]) for i in range(n))
        total += n
    assert float(ours.compute()) == pytest.approx(float(reference.compute()))
    assert float(ours.compute()) == pytest.approx(hits / total)


def test_collection_names_and_bad_k() -> None:
    assert set(accuracy_metrics(5, prefix="val/", postfix="_clean").keys()) == {"val/acc1_clean", "val/acc5_clean"}
    assert set(accuracy_metrics(4).keys()) == {"acc1"}
    with pytest.raises(ValueError, match="k must be a positive int"):
        TopKAccuracy(0)
