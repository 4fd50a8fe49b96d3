"""NormInjection: the Lightning adapter of :mod:`normlightning.injection` (the ``norm:`` section).

In a config::

    norm:
      method: bgn             # any name of normlightning.norms.available_norms(); null = leave the model as is
      num_groups: auto        # int, auto or auto:<policy> (see docs/methods.md, "Group counts and auto rules")
      kwargs: {eps: 1.0e-5}   # further build_norm keyword arguments for `method`
      overrides:              # first regex (re.fullmatch on the module name) that matches wins
        - {pattern: 'backbone\\.layer4\\..*', method: gn, num_groups: 32}
      exclude: ['backbone\\.fc_norm']
      group_fit: error        # or nearest
      sync: null              # null: follow trainer.sync_batchnorm
      virtual_devices: 1      # k: batch statistics per k equal chunks of the batch, as k DDP processes

``setup`` runs before a checkpoint is restored, before the strategy wraps the model (DDP,
``sync_batchnorm``) and before ``configure_optimizers``; it is idempotent across stages. When the
run restores a checkpoint that holds an injection spec, the checkpoint's layers are installed
instead of the config's (a mismatch is warned about), so ``test --ckpt_path`` works even when the
``norm:`` section could not be built for this model. A model that already carries injected layers
(from :func:`~normlightning.injection.inject` before the run) is left as it is when the ``norm:``
settings ask for the same layers; settings that ask for others raise ``ValueError`` at ``setup``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from normlightning.checkpoint_files import read_checkpoint
from normlightning.injection.apply import apply_spec, inject
from normlightning.injection.plan import format_summary, plan_injection, summary_rows
from normlightning.injection.rules import InjectionRules
from normlightning.injection.spec import CHECKPOINT_KEY, get_spec, same_layers
from normlightning.training.norm_sync import set_statistics_sync, trainer_syncs_batchnorm


class NormInjection(Callback):
    """Replace the model's normalization layers with ``normlightning.norms`` layers at ``setup``.

    Args:
        method, num_groups, kwargs, targets, overrides, exclude, group_fit, copy_state: the
            injection settings, see :class:`~normlightning.injection.rules.InjectionRules`
            (``targets`` default: BatchNorm1d/2d/3d and timm's BatchNormAct2d, matched by exact type).
        batch_size: per-process batch size for ``auto``; default ``trainer.datamodule.batch_size``.
        weight_standardization: apply WS to every ``param_norm_targets`` layer (not with weight_norm).
        weight_norm: apply weight normalization to every ``param_norm_targets`` layer.
        weight_centering: subtract each output unit's weight mean in every ``param_norm_targets``
            layer (MABN's centred convolutions; docs/methods.md, section "mabn").
        param_norm_targets: layer classes that get WS / WN (default Conv1d/2d/3d).
        param_norm_exclude: regexes of those layers to leave alone (e.g. the classifier).
        remove_following_activation: replace the activation module after each layer that applies its
            own (``frn`` with its TLU, which replaces the ReLU in the paper) by ``nn.Identity``; the
            summary names each removed activation. Default: keep them (the summary says so).
        sync: all-reduce the batch statistics of the injected layers across processes while
            training (``True``), keep them per process (``False``), or follow
            ``trainer.sync_batchnorm`` (``None``, default). Per-process is the papers' setting.
        log_summary: print the summary table (rank 0) and log it to TensorBoard as text.
        virtual_devices: ``k``: in training, every replaced layer with batch statistics computes them
            separately on ``k`` equal consecutive chunks of each batch, as ``k`` DDP processes with
            per-process statistics whose local batches are those chunks (in each real process under
            DDP); ``auto`` group counts use the per-device batch ``batch_size / k``; the running
            statistics move by the mean of the chunks' updates (docs/methods.md, "Virtual devices").
            Not combined with synchronized statistics (``sync``).

    Attributes:
        checkpoint_path: the checkpoint this run restores (set by the CLI from ``--ckpt_path``;
            otherwise ``trainer.ckpt_path`` is read): its stored spec wins over the settings.
        spec, summary_rows: the applied spec and its summary table rows (after ``setup``).
    """

    def __init__(
        self,
        method: str | None = None,
        num_groups: int | str | None = None,
        kwargs: dict[str, Any] | None = None,
        targets: list[str] | None = None,
        overrides: list[dict[str, Any]] | None = None,
        exclude: list[str] | None = None,
        group_fit: Literal["error", "nearest"] = "error",
        batch_size: int | None = None,
        copy_state: bool = True,
        weight_standardization: bool = False,
        weight_norm: bool = False,
        weight_centering: bool = False,
        param_norm_targets: list[str] | None = None,
        param_norm_exclude: list[str] | None = None,
        remove_following_activation: bool = False,
        sync: bool | None = None,
        log_summary: bool = True,
        virtual_devices: int = 1,
    ) -> None:
        super().__init__()
        chosen = [
            k
            for k, on in (
                ("weight_standardization", weight_standardization),
                ("weight_norm", weight_norm),
                ("weight_centering", weight_centering),
            )
            if on
        ]
        if len(chosen) > 1:
            raise ValueError(f"norm.{' and norm.'.join(chosen)} are exclusive; set at most one")
        self.rules = InjectionRules(
            method=method,
            num_groups=num_groups,
            kwargs=kwargs,
            targets=targets,
            overrides=overrides,
            exclude=exclude,
            group_fit=group_fit,
            copy_state=copy_state,
            param_norm=chosen[0] if chosen else None,
            param_norm_targets=param_norm_targets,
            param_norm_exclude=param_norm_exclude,
            virtual_devices=virtual_devices,
            remove_following_activation=remove_following_activation,
        )
        self.batch_size = batch_size
        self.sync = sync
        self.log_summary = log_summary
        self.checkpoint_path: str | None = None
        self.spec: dict[str, Any] | None = None
        self.summary_rows: list[dict[str, str]] = []

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Inject (once per process; idempotent across stages), print and log the summary."""
        if get_spec(pl_module) is not None:
            if self.spec is None:
                if not self.rules.changes_nothing:  # raises when the norm: settings ask for other layers
                    inject(
                        pl_module,
                        self.rules,
                        example_input=pl_module.example_input_array,
                        batch_size=self._batch_size(trainer),
                    )
                self.spec = get_spec(pl_module)
                rank_zero_info("NormInjection: the model already carries injected layers; left as is")
        else:
            stored = self._checkpoint_spec(trainer)
            if stored is not None:
                self._restore(pl_module, stored, trainer)
            elif not self.rules.changes_nothing:
                self.spec, self.summary_rows = inject(
                    pl_module,
                    self.rules,
                    example_input=pl_module.example_input_array,
                    batch_size=self._batch_size(trainer),
                )
                self._report(trainer, "replaced")
            if self.spec is not None and type(pl_module).on_save_checkpoint is LightningModule.on_save_checkpoint:
                rank_zero_warn(
                    f"NormInjection: {type(pl_module).__name__} does not write the injected layers into its "
                    "checkpoints; call normlightning.injection.store_injection(self, checkpoint) in its "
                    "on_save_checkpoint and restore_injection in on_load_checkpoint (BaseTask does both)"
                )
        if self._sync_enabled(trainer):
            n = set_statistics_sync(pl_module, True)
            if self.sync is None and stage == "fit":
                rank_zero_info(
                    f"NormInjection: trainer.sync_batchnorm=True -> all-reducing the batch statistics of {n} "
                    "normlightning layer(s) too (set norm.sync=false to keep them per process)"
                )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # layers may have been rebuilt by a checkpoint restore after setup: (re)apply the sync flag
        if self._sync_enabled(trainer):
            set_statistics_sync(pl_module, True)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._sync_enabled(trainer):
            set_statistics_sync(pl_module, False)

    # ------------------------------------------------------------------ helpers
    def _batch_size(self, trainer: Trainer) -> int | None:
        if self.batch_size is not None:
            return self.batch_size
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        return batch_size if isinstance(batch_size, int) else None

    def _checkpoint_spec(self, trainer: Trainer) -> dict[str, Any] | None:
        """The spec stored in the checkpoint this run restores (``None``: no checkpoint or no spec)."""
        path = self.checkpoint_path or trainer.ckpt_path
        if path is None or not isinstance(path, (str, os.PathLike)) or str(path) in ("last", "best", "hpc", "registry"):
            return None
        return read_checkpoint(path).get(CHECKPOINT_KEY)

    def _restore(self, pl_module: LightningModule, stored: dict[str, Any], trainer: Trainer) -> None:
        """Install the checkpoint's layers; warn when the ``norm:`` settings would build others."""
        planned, failure = None, None
        if not self.rules.changes_nothing:
            try:
                planned, _ = plan_injection(
                    pl_module,
                    self.rules,
                    example_input=pl_module.example_input_array,
                    batch_size=self._batch_size(trainer),
                )
            except (ValueError, TypeError) as err:
                failure = err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # apply_spec's own mismatch warning: ours below is more precise
            apply_spec(pl_module, stored)
        self.spec = get_spec(pl_module)
        self.summary_rows = summary_rows(pl_module, self.spec)
        if failure is not None or (planned is not None and not same_layers(planned, stored)):
            why = f"cannot be built for this model ({failure})" if failure else "would build other layers"
            rank_zero_warn(f"NormInjection: the norm: settings {why}; using the layers stored in the checkpoint")
        self._report(trainer, "restored from the checkpoint")

    def _sync_enabled(self, trainer: Trainer) -> bool:
        return self.sync if self.sync is not None else trainer_syncs_batchnorm(trainer)

    def summary_table(self) -> str:
        """The last summary as a Markdown table (layer | old type | new type | effective args)."""
        return format_summary(self.summary_rows)

    def _report(self, trainer: Trainer, what: str) -> None:
        if not self.log_summary:
            return
        table = self.summary_table()
        rank_zero_info(f"NormInjection: {what} {len(self.spec['layers'])} layer(s)\n{table}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text("norm_injection/summary", table, global_step=trainer.global_step)
