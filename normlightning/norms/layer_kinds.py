"""Which modules are normalization layers, and which keep statistics of the batch.

One definition for every part of normlightning that treats norm layers specially (the
optimizer's parameter groups, the attack and few-shot statistics modes, the statistics monitor,
recalibration, statistics sync), for ``torch.nn``'s layers and ours alike.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from normlightning.norms.base import NormLayer

#: torch's own normalization layers: BatchNorm*/SyncBatchNorm/InstanceNorm* (``_NormBase``),
#: GroupNorm, LayerNorm (and RMSNorm where torch has it).
NATIVE_NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def is_norm_layer(module: nn.Module) -> bool:
    """True for a normalization layer: ours (:class:`NormLayer`, or a plugin class that declares
    ``uses_batch_statistics``) or one of :data:`NATIVE_NORM_TYPES`."""
    if isinstance(module, (NormLayer, *NATIVE_NORM_TYPES)):
        return True
    return isinstance(getattr(type(module), "uses_batch_statistics", None), bool)


def is_batch_statistic_layer(module: nn.Module) -> bool:
    """True for a layer that keeps running statistics of a set including the batch axis.

    Native BatchNorm with ``track_running_stats``, and our layers with ``uses_batch_statistics``
    (and ``reset_running_stats``; ``track_running_stats`` respected when a layer has it).
    """
    if isinstance(module, _BatchNorm):
        return bool(module.track_running_stats) and module.running_mean is not None
    if getattr(type(module), "uses_batch_statistics", False) is True:
        return getattr(module, "track_running_stats", True) is not False and hasattr(module, "reset_running_stats")
    return False
