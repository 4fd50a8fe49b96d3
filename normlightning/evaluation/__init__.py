"""Measuring a model: the tasks' metrics and the post-training tools' evaluation outside the Trainer loop.

- :mod:`.metrics`: the top-k accuracies every task logs (torchmetrics);
- :mod:`.confidence_interval`: mean and 95% confidence interval of few-shot episode accuracies;
- :mod:`.accuracy`: top-1 accuracy over a loader outside the Trainer (recalibration, example weighing);
- :mod:`.progress`: progress bars for those tools, drawn like Lightning's.
"""
