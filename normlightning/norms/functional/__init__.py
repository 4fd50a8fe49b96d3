"""The math of every normalization method, written once as pure functions.

Every batch-statistic method is "normalize ``x (N, C, *spatial)`` over a set"; the layer classes
of :mod:`normlightning.norms` own parameters and buffers and call these functions. The
conventions (biased variance with ``eps`` inside the root, per-channel affine, PyTorch's
running-statistics update with the unbiased variance, the momentum factor ``f``) are in
docs/methods.md, section "Shared conventions".

Every method of an activation ``x`` returns a tensor in ``x``'s shape, dtype and memory format
(:class:`~.layout.NormInput`). Modules: :mod:`.layout` (compute dtype, ``(N, C, S)`` view,
output layout), :mod:`.native` (the native batch norm, its backward fed the input's layout),
:mod:`.moments` (statistics of sets, all-reduce, running statistics),
:mod:`.fused_ops` (one-pass normalize + affine), :mod:`.batch_sets` (bn, ghost, brn, example
weighing), :mod:`.batch_group` (bgn), :mod:`.group_sets` (gn, ln, in, pn, seqnorm),
:mod:`.general_batch_group` (gbgn), :mod:`.mixed_statistics` (hn, sn),
:mod:`.pooled_sets` (the one-node training path of bgn, gbgn, hn, sn, seqnorm),
:mod:`.parameter_norms` (weight standardization).
"""

from ..group_args import divisors, nearby_divisors
from .batch_group import batch_group_norm
from .batch_sets import batch_norm, batch_renorm, example_weighted_norm, ghost_norm
from .general_batch_group import general_batch_group_channel_statistics, general_batch_group_norm
from .group_sets import flat_group_norm, group_norm, instance_norm, layer_norm, positional_norm, sequential_norm
from .layout import compute_dtype
from .mixed_statistics import (
    heterologous_channel_statistics,
    heterologous_norm,
    is_batch_set,
    parse_set_spec,
    switchable_norm,
)
from .moments import chunk_sizes, combine_moments, reduce_mean, row_moments, synced_mean_var, update_running_stats
from .parameter_norms import weight_standardize

__all__ = [
    "is_batch_set",
    "compute_dtype",
    "synced_mean_var",
    "row_moments",
    "combine_moments",
    "reduce_mean",
    "update_running_stats",
    "batch_norm",
    "ghost_norm",
    "batch_group_norm",
    "group_norm",
    "flat_group_norm",
    "layer_norm",
    "instance_norm",
    "positional_norm",
    "sequential_norm",
    "general_batch_group_norm",
    "general_batch_group_channel_statistics",
    "example_weighted_norm",
    "heterologous_norm",
    "heterologous_channel_statistics",
    "switchable_norm",
    "batch_renorm",
    "weight_standardize",
    "parse_set_spec",
    "divisors",
    "nearby_divisors",
    "chunk_sizes",
]
