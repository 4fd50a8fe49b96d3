"""ClassificationTask: image classification with any backbone from the registry.

``forward(x) = backbone(normalize(x))`` where ``x`` is a batch of images in pixel space
``[0, 1]`` of shape ``(N, *input_shape)`` and ``normalize`` is the per-channel
:class:`~normlightning.models.input_normalization.InputNormalization`, the model's first
module. Loss: cross-entropy with optional label smoothing. Metrics (torchmetrics, one
collection per stage, epoch-level, synchronized across processes; see
:func:`~normlightning.evaluation.metrics.accuracy_metrics` and :meth:`ClassificationTask.update_metrics`):
``{stage}/acc1`` and,
with at least 5 classes, ``{stage}/acc5``, for ``stage`` in ``train``, ``val``, ``test``;
``train/loss`` at the logging steps (see :meth:`ClassificationTask._logs_this_step`),
``val/loss`` and ``test/loss`` per epoch.

Subclasses change training through two hooks and keep the metrics and logging of the
training step: :meth:`ClassificationTask.prepare_training_batch` (a batch-level transform such
as mixup) and :meth:`ClassificationTask.training_loss` (the loss: a penalty, mixed targets).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MetricCollection
from typing_extensions import override

from normlightning.data.base import missing_link_error
from normlightning.evaluation.metrics import accuracy_metrics
from normlightning.models import build_backbone
from normlightning.models.input_normalization import InputNormalization
from normlightning.models.weights import WeightsReport, load_backbone_weights
from normlightning.tasks.base import BaseTask

LoopStage = Literal["train", "val", "test"]
#: The stages whose step is :meth:`ClassificationTask.eval_step`.
EvalStage = Literal["val", "test"]


class ClassificationTask(BaseTask):
    """Classify images into ``num_classes`` classes.

    Args:
        backbone: a name from :func:`normlightning.models.available_backbones`, any
            torchvision classification model (``resnet18``, ``mobilenet_v2``, ...) or
            ``timm/<architecture>``.
        num_classes: number of classes (linked from ``data.num_classes`` by the CLI); required.
        backbone_kwargs: extra arguments for the backbone factory (e.g. ``{width: 16}``).
        backbone_weights: a pretrained starting point, loaded into the backbone right after it
            is built (so before the ``norm:`` injection): a local ``.pt``/``.pth``/``.bin``/
            ``.safetensors`` state_dict, or a torchvision weights name (``IMAGENET1K_V1``) read
            from the local torch hub cache; a head of another ``num_classes`` is skipped and
            reported (:func:`~normlightning.models.weights.load_backbone_weights`). Not saved
            in the hyperparameters: a checkpoint holds the trained weights, and
            ``load_from_checkpoint`` does not need the file (the run's ``config.yaml`` names it).
        input_shape: ``(C, H, W)`` of one image (linked from ``data.input_shape``); required.
        input_mean: per-channel mean for the input normalization (linked from ``data.mean``);
            ``None`` means 0 for every channel.
        input_std: per-channel std (linked from ``data.std``); ``None`` means 1.
        label_smoothing: cross-entropy label smoothing in ``[0, 1)``.
        **kwargs: the :class:`~normlightning.tasks.base.BaseTask` arguments (optimizer, LR
            scheduler, norm weight decay, linear LR scaling).
    """

    monitor = "val/acc1"
    unsaved_hparams = ("backbone_weights",)

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_weights: str | None = None,
        input_shape: tuple[int, int, int] | None = None,
        input_mean: tuple[float, ...] | None = None,
        input_std: tuple[float, ...] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for setting, value in (("num_classes", num_classes), ("input_shape", input_shape)):
            if value is None:
                raise missing_link_error(setting)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        input_shape = tuple(int(s) for s in input_shape)
        channels = input_shape[0]
        mean = tuple(input_mean) if input_mean is not None else (0.0,) * channels
        std = tuple(input_std) if input_std is not None else (1.0,) * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"input_mean/input_std need one value per channel ({channels} from input_shape={input_shape}), "
                f"got {len(mean)} and {len(std)} values"
            )
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.normalize = InputNormalization(mean, std)
        self.backbone = build_backbone(backbone, num_classes, input_shape, **(backbone_kwargs or {}))
        self.backbone_weights_report: WeightsReport | None = None
        if backbone_weights is not None:
            self.backbone_weights_report = load_backbone_weights(
                self.backbone,
                backbone_weights,
                backbone=backbone,
                num_classes=num_classes,
                input_channels=input_shape[0],
            )
            rank_zero_info(self.backbone_weights_report.summary())
        self.example_input_array = torch.zeros(2, *input_shape)
        self._metrics_logged: dict[str, set[int]] = {}  # stage -> metric collections logged this epoch
        self.configure_metrics()

    def configure_metrics(self) -> None:
        """One metric collection per stage: ``acc1`` (and ``acc5`` when ``num_classes >= 5``)."""
        self.train_metrics = accuracy_metrics(self.num_classes, prefix="train/")
        self.val_metrics = accuracy_metrics(self.num_classes, prefix="val/")
        self.test_metrics = accuracy_metrics(self.num_classes, prefix="test/")

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes)``."""
        return self.backbone(self.normalize(x))

    def cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """``CE(logits, y)`` with the task's label smoothing, mean over the batch (the val/test loss)."""
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def prepare_training_batch(self, batch: Any) -> Any:
        """Transform a training batch before the forward (default: unchanged).

        Override for batch-level augmentation (e.g. mixup). The returned batch must keep the
        inputs at index 0 (fed to the model) and targets ``(N,)`` at index 1 (for the training
        accuracy); further items reach :meth:`training_loss`.
        """
        return batch

    def training_loss(self, logits: Tensor, batch: Any) -> Tensor:
        """The loss the training step minimizes, a scalar (default: :meth:`cross_entropy` of
        ``logits`` and the targets ``batch[1]``).

        Args:
            logits: ``self(batch[0])``, shape ``(N, num_classes)``.
            batch: the training batch, as :meth:`prepare_training_batch` returned it.

        Override to change the training loss (a penalty term, mixed targets): the training step
        still updates and logs ``train/acc1`` (``train/acc5``) from ``logits`` against
        ``batch[1]`` and logs the returned value as ``train/loss``. Validation and test losses
        stay :meth:`cross_entropy`. (:class:`~normlightning.tasks.AdversarialTask` has its own
        training step and does not call either hook.)
        """
        return self.cross_entropy(logits, batch[1])

    def update_metrics(self, stage: str, metrics: MetricCollection, logits: Tensor, y: Tensor) -> None:
        """Update the epoch-level ``metrics`` of ``stage`` with a step's logits and targets.

        The metric objects are handed to ``self.log_dict`` once per epoch, at their first update:
        Lightning computes them over the whole epoch at its end (synchronized across processes)
        and resets them, exactly as when they are logged every step, which costs Lightning more
        per step than a small model's training step (benchmarks/lightning_overhead.py).
        """
        metrics.update(logits, y)
        if id(metrics) not in self._metrics_logged.setdefault(stage, set()):
            self._metrics_logged[stage].add(id(metrics))
            self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test")

    def _log_step(self, stage: LoopStage, logits: Tensor, y: Tensor, loss: Tensor) -> None:
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        self.update_metrics(stage, metrics, logits, y)
        if stage != "train":  # val/test losses are epoch means, averaged over processes under DDP
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=y.shape[0])
        elif self._logs_this_step():
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=y.shape[0])

    def _logs_this_step(self) -> bool:
        """Whether the training step logs ``train/loss``: at the steps the logger writes
        (every ``trainer.log_every_n_steps``), at an epoch's last batch and when training stops
        (a logged value costs Lightning about as much as a small model's step; the logger's
        records and the final ``train/loss`` are the same as logging every step). Outside a
        Trainer: always."""
        trainer = self._trainer
        if trainer is None:
            return True
        return (
            (self.global_step + 1) % max(1, trainer.log_every_n_steps) == 0
            or trainer.is_last_batch
            or trainer.should_stop
        )

    @override
    def on_train_epoch_start(self) -> None:
        self._metrics_logged.pop("train", None)

    @override
    def on_validation_epoch_start(self) -> None:
        self._metrics_logged.pop("val", None)

    @override
    def on_test_epoch_start(self) -> None:
        self._metrics_logged.pop("test", None)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``training_loss(self(x), batch)`` of the prepared batch; logs it and the training accuracy."""
        batch = self.prepare_training_batch(batch)
        logits = self(batch[0])
        loss = self.training_loss(logits, batch)
        self._log_step("train", logits.detach(), batch[1], loss.detach())
        return loss

    def eval_step(self, batch: Any, batch_idx: int, stage: EvalStage) -> None:
        """The validation and test step, the one hook a task overrides for both: logs ``{stage}/loss``
        (:meth:`cross_entropy`) and the ``{stage}/acc1`` (``acc5``) of ``self(batch[0])`` against ``batch[1]``.

        Args:
            batch: one batch of the stage's loader.
            batch_idx: its index in the epoch.
            stage: ``"val"`` or ``"test"`` (the prefix of the logged keys).
        """
        logits = self(batch[0])
        self._log_step(stage, logits, batch[1], self.cross_entropy(logits, batch[1]))

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_step(batch, batch_idx, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_step(batch, batch_idx, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``softmax(logits)`` of shape ``(N, num_classes)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)
