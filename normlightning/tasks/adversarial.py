"""AdversarialTask: PGD adversarial training with clean and robust evaluation.

Training loss ``(1 - w) * CE(f(x), y) + w * CE(f(PGD(x)), y)`` on pixel-space images; validation
and test log clean and robust accuracy. How norm layers compute statistics while an attack runs
(``eval``, ``train``, ``train_frozen``) is an explicit setting per attack. The loss, the modes and
the inference-mode choice are described in ``docs/adversarial.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from normlightning.attacks import PGDConfig
from normlightning.evaluation.metrics import accuracy_metrics
from normlightning.norms.model_walk import STATISTICS_MODES, StatisticsMode, check_statistics_mode, statistics_mode
from normlightning.tasks.classification import ClassificationTask, EvalStage

__all__ = ["AdversarialTask"]

_EVAL_STAGE_IDS = {"val": 1, "test": 2}


def _as_pgd_config(value: PGDConfig | dict[str, Any], setting: str) -> PGDConfig:
    if isinstance(value, PGDConfig):
        return value
    if isinstance(value, dict):
        return PGDConfig(**value)
    raise TypeError(
        f"{setting} must be a PGDConfig or a dict of its fields (eps, step_size, steps, random_start), got {value!r}"
    )


def _describe(attack: PGDConfig) -> str:
    return (
        f"PGD-{attack.steps} (L-inf eps={attack.eps:.4g}, step_size={attack.step_size:.4g}, "
        f"random_start={attack.random_start})"
    )


class AdversarialTask(ClassificationTask):
    """Adversarial training with PGD; clean and robust accuracy for validation and test.

    See the module docstring for the loss, the norm-layer modes and the grad/inference-mode
    choice. Logged metrics: ``train/loss`` (the mixed loss), ``train/loss_robust``,
    ``train/acc1_robust`` (when ``adversarial_weight > 0``), ``train/loss_clean``,
    ``train/acc1_clean`` (when ``adversarial_weight < 1``); ``{val,test}/loss_clean``,
    ``{val,test}/acc1_clean``, ``{val,test}/loss_robust``, ``{val,test}/acc1_robust`` and
    ``acc5_clean``/``acc5_robust`` with at least 5 classes. There is no plain ``val/acc1``: the
    task's :attr:`monitor`, which the ``checkpoint:`` callback keeps the best of, is ``val/acc1_robust``.

    Its training step is its own (clean and robust losses, :meth:`cross_entropy` each): it does
    not call ``prepare_training_batch`` or ``training_loss`` of ``ClassificationTask``.

    Args:
        train_attack: PGD used to make training examples (default: the BGN paper's PGD-4,
            ``eps=0.0157``, ``step_size=2/255``, random start).
        eval_attack: PGD used for robust accuracy in validation/test (default the same;
            e.g. ``steps: 20`` for PGD-20).
        adversarial_weight: ``w`` in ``(1 - w) * CE(clean) + w * CE(adversarial)``, in ``[0, 1]``.
        train_attack_norm_mode: norm-layer mode while the training attack runs:
            ``eval`` | ``train`` | ``train_frozen``.
        eval_attack_norm_mode: the same for the evaluation attack (default ``eval``: attack the
            function that is evaluated).
        eval_attack_seed: seed of the evaluation attack's random start (per batch
            ``seed + 1000003 * stage + batch_idx``, so robust accuracy is reproducible); ``None``
            uses the global RNG.
        backbone, num_classes, input_shape: as in
            :class:`~normlightning.tasks.ClassificationTask`, with CIFAR/WRN defaults.
        lr_scheduler_monitor: as in :class:`~normlightning.tasks.base.BaseTask`, default
            ``val/loss_robust``.
        **kwargs: every other :class:`~normlightning.tasks.ClassificationTask` argument
            (optimizer, scheduler, label smoothing, norm weight decay, LR scaling, ...).
    """

    monitor = "val/acc1_robust"

    def __init__(
        self,
        *,
        train_attack: PGDConfig = PGDConfig(),
        eval_attack: PGDConfig = PGDConfig(),
        adversarial_weight: float = 1.0,
        train_attack_norm_mode: StatisticsMode = "eval",
        eval_attack_norm_mode: StatisticsMode = "eval",
        eval_attack_seed: int | None = 0,
        backbone: str = "wide_resnet",
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        lr_scheduler_monitor: str = "val/loss_robust",
        **kwargs: Any,
    ) -> None:
        train_attack = _as_pgd_config(train_attack, "train_attack")
        eval_attack = _as_pgd_config(eval_attack, "eval_attack")
        if isinstance(adversarial_weight, bool) or not 0.0 <= float(adversarial_weight) <= 1.0:
            raise ValueError(
                "adversarial_weight must be in [0, 1] (1: PGD examples only, 0: clean training), "
                f"got {adversarial_weight!r}"
            )
        check_statistics_mode(train_attack_norm_mode, "train_attack_norm_mode")
        check_statistics_mode(eval_attack_norm_mode, "eval_attack_norm_mode")
        super().__init__(
            backbone=backbone,
            num_classes=num_classes,
            input_shape=input_shape,
            lr_scheduler_monitor=lr_scheduler_monitor,
            **kwargs,
        )
        self.train_attack = train_attack
        self.eval_attack = eval_attack
        self.adversarial_weight = float(adversarial_weight)
        self.train_attack_norm_mode = train_attack_norm_mode
        self.eval_attack_norm_mode = eval_attack_norm_mode
        self.eval_attack_seed = eval_attack_seed

    # ----------------------------------------------------------------- metrics
    @override
    def configure_metrics(self) -> None:
        """``{stage}/acc1_{kind}`` (and ``acc5_{kind}`` with >= 5 classes), kind = clean | robust."""
        self.adv_metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": accuracy_metrics(self.num_classes, prefix=f"{stage}/", postfix=f"_{kind}")
                for stage in ("train", "val", "test")
                for kind in ("clean", "robust")
            }
        )

    # ----------------------------------------------------------------- the attack
    def attack(
        self,
        x: Tensor,
        y: Tensor,
        config: PGDConfig,
        norm_mode: StatisticsMode,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """PGD examples for ``(x, y)`` against ``self`` (pixel space), norm layers in ``norm_mode``.

        Runs outside inference mode with grad enabled, so it works inside Lightning's
        validation/test loops; returns detached ``x_adv`` of ``x``'s shape.
        """
        with torch.inference_mode(False), statistics_mode(self, norm_mode):
            return config(self, x, y, generator=generator)

    def attack_summary(self) -> str:
        """One line stating both attacks, their norm-layer modes and the loss mix."""
        return (
            f"AdversarialTask: train attack {_describe(self.train_attack)} with norm layers in "
            f"'{self.train_attack_norm_mode}' mode ({STATISTICS_MODES[self.train_attack_norm_mode]}); "
            f"eval attack {_describe(self.eval_attack)} with norm layers in '{self.eval_attack_norm_mode}' mode "
            f"({STATISTICS_MODES[self.eval_attack_norm_mode]}); adversarial_weight={self.adversarial_weight:g}"
        )

    @override
    def setup(self, stage: str) -> None:
        """Write :meth:`attack_summary` to the log and, with TensorBoard, as text ``adversarial/settings``."""
        super().setup(stage)
        summary = self.attack_summary()
        rank_zero_info(summary)
        trainer = self._trainer
        if trainer is not None and isinstance(trainer.logger, TensorBoardLogger) and trainer.is_global_zero:
            trainer.logger.experiment.add_text("adversarial/settings", summary)

    # ----------------------------------------------------------------- steps
    def _log_kind(self, stage: str, kind: str, logits: Tensor, y: Tensor, loss: Tensor) -> None:
        self.update_metrics(stage, self.adv_metrics[f"{stage}_{kind}"], logits, y)
        self.log(f"{stage}/loss_{kind}", loss, on_step=stage == "train", on_epoch=True, batch_size=y.shape[0])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        w = self.adversarial_weight
        total = x.new_zeros(())
        if w > 0:
            x_adv = self.attack(x, y, self.train_attack, self.train_attack_norm_mode)
        if w < 1:
            logits = self(x)
            loss = self.cross_entropy(logits, y)
            self._log_kind("train", "clean", logits.detach(), y, loss.detach())
            total = total + (1 - w) * loss
        if w > 0:
            logits = self(x_adv)
            loss = self.cross_entropy(logits, y)
            self._log_kind("train", "robust", logits.detach(), y, loss.detach())
            total = total + w * loss
        self.log("train/loss", total, on_step=True, on_epoch=True, prog_bar=True, batch_size=y.shape[0])
        return total

    def _eval_generator(self, x: Tensor, stage: str, batch_idx: int) -> torch.Generator | None:
        if self.eval_attack_seed is None:
            return None
        seed = self.eval_attack_seed + 1_000_003 * _EVAL_STAGE_IDS[stage] + batch_idx
        return torch.Generator(device=x.device).manual_seed(seed)

    @override
    def eval_step(self, batch: Any, batch_idx: int, stage: EvalStage) -> None:
        """Clean and robust loss and accuracy of ``batch`` (the evaluation attack seeded per ``batch_idx``)."""
        x, y = batch[0], batch[1]
        generator = self._eval_generator(x, stage, batch_idx)
        x_adv = self.attack(x, y, self.eval_attack, self.eval_attack_norm_mode, generator=generator)
        for kind, inputs in (("clean", x), ("robust", x_adv)):
            logits = self(inputs)
            loss = self.cross_entropy(logits, y)
            self._log_kind(stage, kind, logits, y, loss)
