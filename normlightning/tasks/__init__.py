"""Tasks: LightningModules that own a backbone, the loss, metrics and the optimizer set-up."""

from normlightning.tasks.adversarial import AdversarialTask
from normlightning.tasks.attacks import PGDConfig, pgd_attack
from normlightning.tasks.base import BaseTask, default_optimizer
from normlightning.tasks.classification import ClassificationTask
from normlightning.tasks.few_shot import FewShotTask
from normlightning.tasks.piecewise_lr import PiecewiseConstantLR

__all__ = [
    "AdversarialTask",
    "BaseTask",
    "ClassificationTask",
    "FewShotTask",
    "PGDConfig",
    "PiecewiseConstantLR",
    "default_optimizer",
    "pgd_attack",
]
