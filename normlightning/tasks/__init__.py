"""Tasks: LightningModules that own a backbone, the loss, metrics and the optimizer set-up.

What they are built from lives beside them: :mod:`normlightning.training` (LR scaling and schedule,
norm weight decay, resume RNG states, the last-batch check, statistics sync),
:mod:`normlightning.evaluation` (metrics) and :mod:`normlightning.attacks` (PGD).
"""

from normlightning.tasks.adversarial import AdversarialTask
from normlightning.tasks.base import BaseTask, default_optimizer
from normlightning.tasks.classification import ClassificationTask
from normlightning.tasks.few_shot import FewShotTask

__all__ = [
    "AdversarialTask",
    "BaseTask",
    "ClassificationTask",
    "FewShotTask",
    "default_optimizer",
]
