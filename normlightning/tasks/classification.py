"""ClassificationTask: image classification with any backbone from the registry.

``forward(x) = backbone(normalize(x))`` where ``x`` is a batch of images in pixel space
``[0, 1]`` of shape ``(N, *input_shape)`` and ``normalize`` is the per-channel
:class:`~normlightning.models.input_normalization.InputNormalization`, the model's first
module. Loss: cross-entropy with optional label smoothing. Metrics (torchmetrics, one
collection per stage, epoch-level, synchronized across processes): ``{stage}/acc1`` and,
with at least 5 classes, ``{stage}/acc5``, for ``stage`` in ``train``, ``val``, ``test``;
``train/loss`` every step, ``val/loss`` and ``test/loss`` per epoch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from normlightning.data.base import missing_link_error
from normlightning.models import build_backbone
from normlightning.models.input_normalization import InputNormalization
from normlightning.tasks.base import BaseTask

Stage = Literal["train", "val", "test"]


class ClassificationTask(BaseTask):
    """Classify images into ``num_classes`` classes.

    Args:
        backbone: a name from :func:`normlightning.models.available_backbones` or any
            torchvision classification model (``resnet18``, ``mobilenet_v2``, ...).
        num_classes: number of classes (linked from ``data.num_classes`` by the CLI); required.
        backbone_kwargs: extra arguments for the backbone factory (e.g. ``{width: 16}``).
        input_shape: ``(C, H, W)`` of one image (linked from ``data.input_shape``); required.
        input_mean: per-channel mean for the input normalization (linked from ``data.mean``);
            ``None`` means 0 for every channel.
        input_std: per-channel std (linked from ``data.std``); ``None`` means 1.
        label_smoothing: cross-entropy label smoothing in ``[0, 1)``.
        **kwargs: the :class:`~normlightning.tasks.base.BaseTask` arguments (optimizer, LR
            scheduler, norm weight decay, linear LR scaling).
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        num_classes: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
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
        self.save_hyperparameters()
        input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
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
        self.example_input_array = torch.zeros(2, *input_shape)
        self.configure_metrics()

    def configure_metrics(self) -> None:
        """One ``MetricCollection`` per stage: ``acc1`` (and ``acc5`` when ``num_classes >= 5``)."""
        metrics: dict[str, MulticlassAccuracy] = {
            "acc1": MulticlassAccuracy(num_classes=self.num_classes, top_k=1, average="micro")
        }
        if self.num_classes >= 5:
            metrics["acc5"] = MulticlassAccuracy(num_classes=self.num_classes, top_k=5, average="micro")
        collection = MetricCollection(metrics)
        self.train_metrics = collection.clone(prefix="train/")
        self.val_metrics = collection.clone(prefix="val/")
        self.test_metrics = collection.clone(prefix="test/")

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes)``."""
        return self.backbone(self.normalize(x))

    def _shared_step(self, batch: Any, stage: Stage) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        metrics(logits, y)
        train = stage == "train"
        # train/loss every step; val/test losses are epoch means, averaged over processes under DDP
        self.log(
            f"{stage}/loss", loss, on_step=train, on_epoch=not train, prog_bar=True, sync_dist=not train,
            batch_size=x.shape[0],
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test", batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``softmax(logits)`` of shape ``(N, num_classes)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)
