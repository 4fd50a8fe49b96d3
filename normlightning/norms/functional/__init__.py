"""The math of every normalization method, written once as pure functions.

Every batch-statistic method is "normalize ``x (N, C, *spatial)`` over a set"; the layer classes
of :mod:`normlightning.norms` own parameters and buffers and call these functions. The
conventions (biased variance with ``eps`` inside the root, per-channel affine, PyTorch's
running-statistics update with the unbiased variance, the momentum factor ``f``) are in
docs/methods.md, section "Shared conventions".

Every method of an activation ``x`` returns a tensor in ``x``'s shape, dtype and memory format
(:class:`~.layout.NormInput`). A method's math is the module named as its layer's module in
:mod:`normlightning.norms` (``sequential_norm`` here for ``norms/sequential_norm.py``): :mod:`.batch_norm`
(bn, brn), :mod:`.ghost_norm`, :mod:`.sequential_norm`, :mod:`.batch_group_norm` (bgn),
:mod:`.general_batch_group_norm` (gbgn), :mod:`.heterologous_norm` (hn), :mod:`.switchable_norm` (sn),
:mod:`.per_example` (gn, gnflat, ln, in, pn), :mod:`.filter_response_norm`, :mod:`.evonorm`,
:mod:`.mabn`, :mod:`.cross_iteration_bn`, :mod:`.param_norms` (weight standardization and centering).
The package re-exports each method's function, so ``functional.sequential_norm`` is the function;
the module is ``importlib.import_module("normlightning.norms.functional.sequential_norm")`` (or
``from normlightning.norms.functional.sequential_norm import ...``).
Math shared by several methods is in modules named for what it is: :mod:`.layout` (compute dtype,
``(N, C, S)`` view, output layout), :mod:`.native` (the native batch norm, its backward fed the
input's layout), :mod:`.moments` (statistics of sets, all-reduce, running statistics),
:mod:`.fused_ops` (one-pass normalize + affine), :mod:`.example_weighing` (bn, ghost, gbgn at
inference), :mod:`.pooled_sets` (the one-node training path of hn, sn, seqnorm).

Where inference statistics are constants per channel, the layer decides it (its
``inference_channel_statistics()``, :class:`~normlightning.norms.base.BatchStatNorm`) and these
functions' eval branches cover the other cases only. Set-size checks (a set of one element in
training) are here, in the functional, next to the set they size (:func:`~.moments.check_set_size`).
"""

from ..group_args import divisors, nearby_divisors
from .batch_group_norm import batch_group_norm
from .batch_norm import batch_norm, batch_renorm
from .example_weighing import example_weighted_norm
from .general_batch_group_norm import general_batch_group_channel_statistics, general_batch_group_norm
from .ghost_norm import ghost_norm
from .heterologous_norm import heterologous_channel_statistics, heterologous_norm, is_batch_set, parse_set_spec
from .layout import compute_dtype
from .moments import chunk_sizes, combine_moments, reduce_mean, row_moments, synced_mean_var, update_running_stats
from .param_norms import weight_standardize
from .per_example import flat_group_norm, group_norm, instance_norm, layer_norm, positional_norm
from .sequential_norm import sequential_norm
from .switchable_norm import switchable_norm

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
