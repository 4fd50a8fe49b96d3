"""normlightning.norms: every normalization method behind one registry.

``build_norm(name, num_features, **kwargs)``; ``norm_layer(name, **kwargs)`` for torchvision/timm
``norm_layer=`` arguments; names: bn gn gnflat ln in pn ghost seqnorm bgn gbgn hn sn brn frn evonorm_b0
evonorm_s0 mabn cbn, ``timm/<name>`` for timm's norm layers, and those of installed packages (entry-point
group ``normlightning.norms``, :mod:`.registry`).
:func:`normlightning.norms.testing.check_norm_layer` checks a layer against the contract of every method.
The math lives once in :mod:`normlightning.norms.functional`; the layer classes are modules over it
that hold the arguments, parameters and running statistics, check their arguments, and call it.
Method ``x``'s layer is in ``norms/<x>.py`` and its math in ``norms/functional/<x>.py`` (``per_example``:
gn, gnflat, ln, in, pn). Beside the methods: :mod:`.base` (the layers' base classes), :mod:`.registry`
(names -> layers), :mod:`.zoo_factory` (``norm_layer(name)`` for the model zoos' ``norm_layer=``),
:mod:`.model_walk` (a model's norm layers: ``is_norm_layer``, ``statistics_mode``), :mod:`.group_args`,
:mod:`.testing`, :mod:`.op_count`, :mod:`.timm_layers`, :mod:`.with_carried`.
"""

from . import functional
from .base import BatchStatNorm, NormLayer
from .batch_group_norm import BGN_PAPER_GROUPS, BatchGroupNorm
from .batch_norm import BatchNorm, BatchRenorm
from .cross_iteration_bn import CrossIterationBatchNorm
from .evonorm import EvoNormB0, EvoNormS0
from .filter_response_norm import FilterResponseNorm
from .general_batch_group_norm import GeneralBatchGroupNorm
from .ghost_norm import GhostNorm
from .group_args import AutoContext, GroupArg
from .heterologous_norm import HeterologousNorm
from .mabn import MovingAverageBatchNorm
from .param_norms import (
    WeightCentering,
    WeightStandardization,
    WSConv2d,
    apply_weight_centering,
    apply_weight_norm,
    apply_weight_standardization,
)
from .per_example import FlatGroupNorm, GroupNorm, InstanceNorm, LayerNorm, PositionalNorm
from .registry import available_norms, build_norm, norm_group_args, register_norm
from .sequential_norm import SequentialNorm
from .switchable_norm import SwitchableNorm
from .with_carried import NormWithCarried
from .zoo_factory import norm_layer

__all__ = [
    "functional",
    "NormLayer",
    "BatchStatNorm",
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "FlatGroupNorm",
    "LayerNorm",
    "InstanceNorm",
    "PositionalNorm",
    "GhostNorm",
    "SequentialNorm",
    "BatchGroupNorm",
    "GeneralBatchGroupNorm",
    "BGN_PAPER_GROUPS",
    "HeterologousNorm",
    "SwitchableNorm",
    "FilterResponseNorm",
    "EvoNormB0",
    "EvoNormS0",
    "MovingAverageBatchNorm",
    "CrossIterationBatchNorm",
    "WeightCentering",
    "apply_weight_centering",
    "WeightStandardization",
    "WSConv2d",
    "apply_weight_norm",
    "apply_weight_standardization",
    "AutoContext",
    "GroupArg",
    "available_norms",
    "build_norm",
    "norm_group_args",
    "norm_layer",
    "NormWithCarried",
    "register_norm",
]
