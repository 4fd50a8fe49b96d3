"""BaseTask: the optimizer and learning-rate scheduler handling shared by every task.

The optimizer and scheduler are task arguments (``OptimizerCallable``,
``LRSchedulerCallable``), so a config reads::

    model:
      class_path: normlightning.tasks.ClassificationTask
      init_args:
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.1, momentum: 0.9, weight_decay: 5.0e-4}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.CosineAnnealingLR
          init_args: {T_max: 200}

They are built in :meth:`BaseTask.configure_optimizers` from :meth:`BaseTask.parameter_groups`,
which runs after callbacks' ``setup`` (e.g. a norm injection that replaced layers), so the
optimizer always sees the model's final parameters.

Two more optimizer settings: weight decay on the normalization affine parameters
(``gamma_weight_decay``, ``beta_weight_decay``, ``gamma_decay_target``; see
:mod:`normlightning.training.norm_weight_decay`) and linear LR scaling (``lr_base_batch_size``;
see :mod:`normlightning.training.lr_scaling`). Checkpoints remember injected norm layers
(:mod:`normlightning.injection.spec`): :meth:`BaseTask.on_load_checkpoint` rebuilds
them before the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import AttributeDict, rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from normlightning.checkpoint_files import check_checkpoint_file
from normlightning.injection.apply import restore_injection
from normlightning.injection.spec import store_injection
from normlightning.training.last_batch import check_last_training_batch
from normlightning.training.lr_scaling import linear_lr_factor, scale_learning_rates
from normlightning.training.norm_weight_decay import add_decay_toward_one, check_norm_decay, norm_parameter_groups
from normlightning.training.rng_state import CHECKPOINT_KEY as RNG_CHECKPOINT_KEY
from normlightning.training.rng_state import capture_rng_states, restore_rng_states


def yaml_safe(value: Any) -> Any:
    """``value`` with plain YAML types only, so that ``yaml.safe_load`` reads it back: tuples and
    sets become lists, mappings plain dicts with string keys, paths and enums strings, any other
    object its ``str``; ``None``, bools, ints, floats and strings stay."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [yaml_safe(v) for v in value]
    if isinstance(value, Enum):
        return yaml_safe(value.value)
    return str(value)


def default_optimizer(params: Iterable[Any]) -> Optimizer:
    """The default optimizer: ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


class BaseTask(LightningModule):
    """A LightningModule whose optimizer and LR scheduler come from its arguments.

    Subclasses take keyword-only typed arguments and pass ``optimizer``, ``lr_scheduler``,
    ``lr_scheduler_interval``, ``lr_scheduler_monitor``, ``gamma_weight_decay``,
    ``beta_weight_decay``, ``gamma_decay_target`` and ``lr_base_batch_size`` on to ``super().__init__``,
    which saves the arguments of every ``__init__`` of the task's classes as its hyperparameters
    (:meth:`save_hyperparameters`, the one place they are handled): they are then saved in checkpoints
    and ``SubTask.load_from_checkpoint(path)`` rebuilds the task. A subclass declares the arguments
    to leave out in :attr:`unsaved_hparams` and the metric its checkpoint keeps in :attr:`monitor`.

    Args:
        optimizer: a callable ``params -> Optimizer`` (in a config: ``class_path`` of an
            optimizer and its ``init_args`` minus ``params``). Default:
            :func:`default_optimizer`, ``SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``.
        lr_scheduler: a callable ``optimizer -> LRScheduler`` or ``None`` (constant LR).
        lr_scheduler_interval: step the scheduler every ``"epoch"`` or every ``"step"``.
        lr_scheduler_monitor: metric that a ``ReduceLROnPlateau`` scheduler watches.
        gamma_weight_decay: weight decay of the norm layers' ``weight`` (gamma); ``None``:
            the optimizer's ``weight_decay``; ``0``: none.
        beta_weight_decay: the same for the norm layers' ``bias`` (beta).
        gamma_decay_target: decay gamma toward ``0`` (the optimizer's decay) or ``1`` (the
            "Four Things" authors' choice: ``grad += wd * (gamma - 1)`` before each step, after gradient
            clipping: never clipped).
        lr_base_batch_size: when set, linear LR scaling
            ``lr = base_lr * batch_size * world_size / lr_base_batch_size`` (``batch_size`` per
            process, from the data module), applied before the scheduler is built.
        compile: compile the task's forward with ``torch.compile`` when the Trainer sets it up
            (:meth:`configure_model`, after the norm injection): ``True`` (the default backend,
            inductor), or a dict of ``torch.compile`` arguments (``{backend: aot_eager}``,
            ``{mode: max-autotune}``). In place (``nn.Module.compile``): parameter names, the
            checkpoints and the injected layers' names stay as they are.
    """

    def __init__(
        self,
        *,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scheduler_monitor: str = "val/loss",
        gamma_weight_decay: float | None = None,
        beta_weight_decay: float | None = None,
        gamma_decay_target: Literal[0, 1] = 0,
        lr_base_batch_size: int | None = None,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> Optimizer, got {optimizer!r}")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"lr_scheduler must be a callable optimizer -> LRScheduler or None, got {lr_scheduler!r}")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.lr_scheduler_monitor = lr_scheduler_monitor
        if lr_base_batch_size is not None and (
            isinstance(lr_base_batch_size, bool) or not isinstance(lr_base_batch_size, int) or lr_base_batch_size < 1
        ):
            raise ValueError(f"lr_base_batch_size must be a positive int or None, got {lr_base_batch_size!r}")
        self.norm_decay = {
            "gamma_weight_decay": gamma_weight_decay,
            "beta_weight_decay": beta_weight_decay,
            "gamma_decay_target": gamma_decay_target,
        }
        check_norm_decay(**self.norm_decay)
        self.lr_base_batch_size = lr_base_batch_size
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be true, false or a dict of torch.compile arguments, got {compile!r}")
        self.compile_options: dict[str, Any] | None = (
            (dict(compile) if isinstance(compile, dict) else {}) if compile else None
        )
        # from this frame up through every subclass's __init__ (Lightning collects their arguments)
        self.save_hyperparameters(frame=inspect.currentframe())

    #: The validation metric whose best value the ``checkpoint:`` callback keeps (higher is better,
    #: ``checkpoint.mode: max``), unless the section names its own ``monitor``. ``None``: no metric (the
    #: checkpoint keeps the latest state as its best). Each task sets its own.
    monitor: str | None = None

    #: Constructor arguments kept out of the saved hyperparameters (and so out of checkpoints): starting
    #: points that a checkpoint makes unnecessary, such as ``backbone_weights``, and evaluation settings
    #: that a checkpoint's values must not override on the command line.
    unsaved_hparams: tuple[str, ...] = ()

    @override
    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.save_hyperparameters`` that keeps checkpoints loadable; ``BaseTask.__init__``
        calls it for every task.

        Launched from the CLI, the optimizer and scheduler arrive as config dicts
        (``class_path``/``init_args``) or import paths and are kept. Python callables (a ``partial``, a
        lambda) are dropped from the saved hyperparameters: they may not pickle, and a
        reloaded task then gets the default optimizer (inference does not need one). The
        arguments a subclass lists in :attr:`unsaved_hparams` are never saved. Dataclass values (an
        attack's :class:`~normlightning.attacks.PGDConfig`) are saved as plain dicts, which a
        weights-only load reads and the task's argument accepts.

        The copy that loggers write (``hparams_initial``, e.g. TensorBoard's ``hparams.yaml``) holds
        plain YAML types only (:func:`yaml_safe`: tuples become lists), so ``yaml.safe_load`` reads
        it; the copy stored in checkpoints (``hparams``) keeps the arguments as given.
        """
        frame = kwargs.pop("frame", None)
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        super().save_hyperparameters(*args, frame=frame, **kwargs)
        drop = [
            key
            for key in ("optimizer", "lr_scheduler")
            if self._hparams.get(key) is not None and not isinstance(self._hparams[key], (dict, str))
        ] + [key for key in self.unsaved_hparams if key in self._hparams]
        if drop:
            self.remove_ignored_hparams(drop)
            for key in drop:
                self._hparams_initial.pop(key, None)
        for saved in (self._hparams, self._hparams_initial):
            for key, value in saved.items():
                if dataclasses.is_dataclass(value) and not isinstance(value, type):
                    saved[key] = dataclasses.asdict(value)
        self._hparams_initial = AttributeDict(yaml_safe(dict(self._hparams_initial)))

    @override
    def setup(self, stage: str) -> None:
        """At ``fit``: check that the epoch's last, incomplete training batch can be normalized
        (:func:`~normlightning.training.last_batch.check_last_training_batch`), so a bad remainder
        fails now, naming ``data.drop_last``, not after a whole epoch."""
        if stage != "fit" or self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            check_last_training_batch(self, datamodule.train_dataloader(), self.trainer.world_size)

    @override
    def configure_model(self) -> None:
        """Compile the forward when the ``compile`` argument asks for it (once; the Trainer calls
        this hook after every callback's ``setup``, so after the norm injection)."""
        if self.compile_options is not None and self._compiled_call_impl is None:
            self.compile(**self.compile_options)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups handed to the optimizer: ``default`` (all trainable parameters) and,
        when ``gamma_weight_decay`` / ``beta_weight_decay`` are set, ``norm_gamma`` / ``norm_beta``
        with their own decay (:func:`~normlightning.training.norm_weight_decay.norm_parameter_groups`).

        Override (or extend) to give groups their own settings. Called from
        :meth:`configure_optimizers`, i.e. after every callback's ``setup``.
        """
        return norm_parameter_groups(self, **self.norm_decay)

    @override
    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip the data gradient (Lightning's ``gradient_clip_val`` / ``gradient_clip_algorithm``), then
        decay gamma toward 1 when ``gamma_decay_target=1`` (``grad += wd * (gamma - 1)``).

        The decay is added after clipping, so it is never clipped, as the optimizer's own
        ``weight_decay`` (applied inside ``optimizer.step``) is not. Lightning calls this hook in
        automatic optimization before every optimizer step, also without clipping; an override
        must call ``super()``. With manual optimization see :meth:`on_before_optimizer_step`.
        """
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        add_decay_toward_one(optimizer)

    @override
    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """With manual optimization (where Lightning does not call :meth:`configure_gradient_clipping`
        and the task clips before ``optimizer.step()``), decay gamma toward 1 here, right before the step."""
        if not self.automatic_optimization:
            add_decay_toward_one(optimizer)

    @classmethod
    @override
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """``LightningModule.load_from_checkpoint`` with ``weights_only=True`` unless the caller passes
        ``weights_only=False`` (their promise that the file is trusted: it may run code), and a clear
        error for a missing, empty or truncated local file (instead of a bare ``EOFError``) or one
        that needs types a weights-only load refuses (``UnsafeFileError``, naming them); injected
        layers are rebuilt by :meth:`on_load_checkpoint`."""
        weights_only = kwargs.setdefault("weights_only", True)
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path):
            check_checkpoint_file(checkpoint_path, weights_only=weights_only is not False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the spec of injected norm layers (if any) and the random-number states."""
        store_injection(self, checkpoint)
        checkpoint[RNG_CHECKPOINT_KEY] = capture_rng_states()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild injected norm layers from the checkpoint's spec, before its weights are loaded.

        When a Trainer resumes from the checkpoint, its random-number states are set again at
        the start of training (after the sanity check, whose loaders draw from them), so the
        resumed run continues as the interrupted one would have.
        """
        restore_injection(self, checkpoint)
        self._rng_states_to_resume = checkpoint.get(RNG_CHECKPOINT_KEY) if self._trainer is not None else None

    @override
    def on_train_start(self) -> None:
        """Continue from the random-number states of the checkpoint this fit resumes (if any)."""
        states = getattr(self, "_rng_states_to_resume", None)
        if states is not None:
            restore_rng_states(states)
            self._rng_states_to_resume = None

    @override
    def configure_optimizers(self) -> Any:
        """Build the optimizer from :meth:`parameter_groups` (LR linearly scaled when
        ``lr_base_batch_size`` is set) and the optional LR scheduler."""
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.lr_base_batch_size is not None:
            batch_size = getattr(self.trainer.datamodule, "batch_size", None)
            if batch_size is None:
                raise ValueError("lr_base_batch_size needs a data module with a `batch_size` attribute (per process)")
            factor = linear_lr_factor(batch_size, self.trainer.world_size, self.lr_base_batch_size)
            lrs = scale_learning_rates(optimizer, factor)
            rank_zero_info(
                f"linear LR scaling: x{factor:g} = {batch_size} x {self.trainer.world_size} / "
                f"{self.lr_base_batch_size} -> lr {lrs}"
            )
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.lr_scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
