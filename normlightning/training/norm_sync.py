"""Cross-process synchronisation of batch statistics for normlightning's layers.

By default every layer normalizes with the statistics of its own process's batch (the
papers' per-GPU setting).  Two ways to all-reduce them instead while training:

* ``norm.sync: true`` (the :class:`~normlightning.callbacks.NormInjection` option), or
* the Lightning plugin :class:`NormSync` (``trainer.plugins: [normlightning.training.NormSync]``),
  a ``LayerSync`` that Lightning applies when the DDP strategy sets up for fitting and reverts at
  teardown.  It flips ``sync_statistics`` on our batch layers and (optionally) converts any
  remaining ``torch.nn`` BatchNorm to ``SyncBatchNorm`` as ``sync_batchnorm=True`` would.

Lightning's own ``sync_batchnorm=True`` (``TorchSyncBatchNorm``) calls
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, which replaces only ``_BatchNorm`` instances;
our layers are never ``_BatchNorm``, so it leaves them in place.  ``NormInjection`` with
``sync: null`` treats ``sync_batchnorm=True`` as a request to sync its layers too, and says so.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.layer_sync import LayerSync, TorchSyncBatchNorm
from torch import nn
from typing_extensions import override

from normlightning.norms.model_walk import has_batch_sets


def set_statistics_sync(model: nn.Module, enabled: bool, process_group: Any = None) -> int:
    """Set ``sync_statistics`` (and ``process_group``) on every normlightning batch layer of ``model``
    (with running statistics or ``track_running_stats=False``, as ``SyncBatchNorm`` converts both).

    Returns the number of layers changed.  A synced layer all-reduces its batch statistics across
    ``process_group`` (``None`` = the default group) when ``torch.distributed`` is initialized.

    Raises:
        ValueError: ``enabled`` while a layer has ``virtual_devices > 1`` (``norm.virtual_devices``):
            virtual devices split each process's batch, sync pools it; the two are not combined.
    """
    if enabled:
        split = sorted({getattr(m, "virtual_devices", 1) for m in model.modules() if has_batch_sets(m)} - {1})
        if split:
            raise ValueError(
                f"synchronized statistics (norm.sync, trainer.sync_batchnorm or NormSync) with norm.virtual_devices="
                f"{','.join(map(str, split))} is not supported: virtual devices split each process's batch, sync pools "
                "it across processes. Set norm.sync: false (per-process statistics) or norm.virtual_devices: 1"
            )
    count = 0
    for module in model.modules():
        if has_batch_sets(module) and hasattr(module, "sync_statistics"):
            module.sync_statistics = enabled
            module.process_group = process_group if enabled else None
            count += 1
    return count


def trainer_syncs_batchnorm(trainer: Any) -> bool:
    """Whether the trainer's strategy carries a batch-norm ``LayerSync`` (``sync_batchnorm=True`` or NormSync)."""
    layer_sync = getattr(getattr(trainer, "strategy", None), "_layer_sync", None)
    return isinstance(layer_sync, (TorchSyncBatchNorm, NormSync))


class NormSync(LayerSync):
    """Lightning ``LayerSync`` plugin: all-reduce the batch statistics of normlightning layers.

    Args:
        process_group: the group to reduce over (``None`` = all processes).
        native_batchnorm: also convert remaining ``torch.nn`` BatchNorm layers (e.g. excluded from
            injection) to ``SyncBatchNorm``, as Lightning's ``sync_batchnorm=True`` would.
    """

    def __init__(self, process_group: Any = None, native_batchnorm: bool = True) -> None:
        self.process_group = process_group
        self.native_batchnorm = native_batchnorm

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        set_statistics_sync(model, True, self.process_group)
        if self.native_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model, self.process_group)
        return model

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        set_statistics_sync(model, False)
        if self.native_batchnorm:
            model = TorchSyncBatchNorm().revert(model)
        return model
