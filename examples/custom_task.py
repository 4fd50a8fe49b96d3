"""A task of your own: ``ClassificationTask`` with mixup, used from a config by ``class_path``.

Mixup (Zhang et al. 2018): for a training batch ``(x, y)`` draw ``lam ~ Beta(alpha, alpha)``
and a permutation ``p`` of the batch, train on

    x_mix = lam * x + (1 - lam) * x[p]
    loss  = lam * CE(f(x_mix), y) + (1 - lam) * CE(f(x_mix), y[p])

Validation and test are unchanged. ``x`` is in pixel space ``[0, 1]`` (the model normalizes
it), so the mix stays in ``[0, 1]``. The task overrides two hooks of ``ClassificationTask``:
``prepare_training_batch`` mixes the batch and ``training_loss`` mixes the two losses; the
training step itself (``train/loss``, ``train/acc1`` against ``y``) is inherited.

Use it from a config (``examples/configs/custom_task.yaml``)::

    model:
      class_path: custom_task.MixupClassificationTask
      init_args: {mixup_alpha: 0.4, backbone: small_cnn, ...}

Run it through this file (its folder is then on ``sys.path``, so ``custom_task`` imports)::

    python examples/custom_task.py fit --config examples/configs/custom_task.yaml

or with the ``normlightning`` command: ``PYTHONPATH=examples normlightning fit --config ...``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normlightning.tasks import ClassificationTask


def mixup(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(lam * x + (1 - lam) * x[perm], y, y[perm])`` for ``x`` ``(N, ...)``, ``y`` ``(N,)``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup: lam must be in [0, 1], got {lam}")
    return lam * x + (1.0 - lam) * x[perm], y, y[perm]


def mixup_loss(logits: Tensor, y_a: Tensor, y_b: Tensor, lam: float, label_smoothing: float = 0.0) -> Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` (mean over the batch)."""
    ce = lambda target: F.cross_entropy(logits, target, label_smoothing=label_smoothing)  # noqa: E731
    return lam * ce(y_a) + (1.0 - lam) * ce(y_b)


class MixupClassificationTask(ClassificationTask):
    """:class:`~normlightning.tasks.ClassificationTask` trained with mixup.

    Args:
        mixup_alpha: ``alpha`` of the ``Beta(alpha, alpha)`` mixing weight; ``0`` turns mixup
            off (plain training). Must be ``>= 0``.
        **kwargs: every :class:`ClassificationTask` argument (backbone, optimizer, ...).
    """

    def __init__(self, *, mixup_alpha: float = 0.2, **kwargs: Any) -> None:
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 disables mixup), got {mixup_alpha}")
        super().__init__(**kwargs)  # saves mixup_alpha and the other arguments as hyperparameters
        self.mixup_alpha = float(mixup_alpha)

    def sample_lam(self) -> float:
        """``lam ~ Beta(alpha, alpha)`` (``1.0`` when ``alpha == 0``), from torch's global RNG."""
        if self.mixup_alpha == 0:
            return 1.0
        alpha = torch.tensor(self.mixup_alpha)
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def prepare_training_batch(self, batch: Any) -> tuple[Tensor, Tensor, Tensor, float]:
        """``(x_mix, y, y[perm], lam)`` for a batch ``(x, y)``; logs ``train/mixup_lam``."""
        x, y = batch[0], batch[1]
        lam = self.sample_lam()
        perm = torch.randperm(x.shape[0], device=x.device)
        x_mix, y_a, y_b = mixup(x, y, lam, perm)
        self.log("train/mixup_lam", lam, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return x_mix, y_a, y_b, lam

    def training_loss(self, logits: Tensor, batch: Any) -> Tensor:
        """:func:`mixup_loss` of the logits of ``x_mix`` (``batch`` as prepared above)."""
        _, y_a, y_b, lam = batch
        return mixup_loss(logits, y_a, y_b, lam, self.label_smoothing)


def main(argv: list[str] | None = None) -> None:
    """The ``normlightning`` command (this file's folder is on ``sys.path`` when run as a script)."""
    from normlightning.cli import main as cli_main

    cli_main(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
