"""Tasks: LightningModules that own a backbone, the loss, metrics and the optimizer set-up."""

from normlightning.tasks.base import BaseTask, default_optimizer
from normlightning.tasks.classification import ClassificationTask

__all__ = ["BaseTask", "ClassificationTask", "default_optimizer"]
