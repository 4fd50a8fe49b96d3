"""normlightning from Python, without the CLI.

1. Build a task (a LightningModule) from a data module's attributes.
2. Inject a normalization method into any ``nn.Module`` (here a torchvision ResNet-18).
3. Train with a ``lightning.Trainer`` and the callbacks the CLI adds (the ``norm:`` injection
   and the checkpoint).
4. Load the checkpoint and get a plain ``nn.Module`` back for deployment.

Offline (scikit-learn's 8x8 digits); about 10 s on 2 CPU cores (val/acc1 0.847 after 3 epochs)::

    python examples/python_api.py
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torchvision
from lightning.pytorch import Trainer
from torch import nn

from normlightning import known_warnings
from normlightning.callbacks import Checkpoint, NormInjection
from normlightning.data import Digits
from normlightning.injection import format_summary, inject
from normlightning.norms.model_walk import is_norm_layer
from normlightning.tasks import ClassificationTask


def build_task(data: Digits) -> ClassificationTask:
    """A classification task for ``data``: what the CLI links from the data module is given here."""
    return ClassificationTask(
        backbone="small_cnn",
        backbone_kwargs={"width": 16},
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        input_mean=data.mean,
        input_std=data.std,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
    )


def inject_into_any_module() -> nn.Module:
    """GroupNorm(32) in place of every BatchNorm of a torchvision ResNet-18, no Trainer involved."""
    model = torchvision.models.resnet18(num_classes=10)
    spec, rows = inject(model, method="gn", num_groups=32)
    print(f"injected {len(spec['layers'])} layers; the first three:\n{format_summary(rows[:3])}")
    return model


def train(task: ClassificationTask, data: Digits, root: Path, max_epochs: int, limit_batches: int | None) -> Path:
    """Fit with BGN injected at setup (``auto`` groups for the batch); returns the last checkpoint."""
    checkpoint = Checkpoint(dirpath=root / "checkpoints", monitor="val/acc1", mode="max", save_last=True)
    trainer = Trainer(
        max_epochs=max_epochs,
        limit_train_batches=limit_batches,
        limit_val_batches=limit_batches,
        callbacks=[NormInjection(method="bgn", num_groups="auto"), checkpoint],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    print(f"val/acc1 = {float(trainer.callback_metrics['val/acc1']):.3f}")
    return Path(checkpoint.last_model_path)


def plain_module(checkpoint: Path) -> nn.Module:
    """The trained model as a plain ``nn.Module`` (input normalization, then the backbone with its
    injected layers) in eval mode: images in ``[0, 1]`` -> logits. Lightning is not needed to run it."""
    task = ClassificationTask.load_from_checkpoint(checkpoint, map_location="cpu")  # rebuilds the BGN layers
    return nn.Sequential(task.normalize, task.backbone).eval()


def main(argv: list[str] | None = None) -> nn.Module:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/python_api"))
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--limit-batches", type=int, default=None, help="train/val batches per epoch (default all)")
    args = parser.parse_args(argv)

    known_warnings.install()  # the CLI's filters of harmless third-party messages (Lightning's logger tip, ...)
    torch.manual_seed(0)
    data = Digits(batch_size=64, num_workers=0)
    inject_into_any_module()
    checkpoint = train(build_task(data), data, args.root, args.max_epochs, args.limit_batches)
    model = plain_module(checkpoint)
    print(
        f"plain module: {type(model).__name__} of {[type(m).__name__ for m in model]}, "
        f"norm layers {sorted({type(m).__name__ for m in model.modules() if is_norm_layer(m)})}"
    )
    with torch.no_grad():
        print(f"logits for one image: {tuple(model(torch.rand(1, *data.input_shape)).shape)}")
    return model


if __name__ == "__main__":
    main()
