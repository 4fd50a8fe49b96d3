"""Model surgery: rewrite any ``nn.Module``'s normalization layers (plain PyTorch, no Lightning).

The user API, importable from here: ``inject(model, method="gn", num_groups=32)`` plans and applies
(settings as keywords or an :class:`InjectionRules`) and returns the spec and the summary rows that
:func:`format_summary` prints; :func:`get_spec` is the spec applied to a model; :func:`store_injection`
and :func:`restore_injection` carry it through a LightningModule's checkpoints; :func:`mark_pretrained`
records weights loaded from a file (the summary names them); :func:`fold_norms` folds norm layers into
the convolutions before them for inference.

The parts, which internal code imports from their modules: settings (:mod:`.rules`), group counts
(:mod:`.groups`), planning and the summary (:mod:`.plan`), modules carried over from subclassed layers
(:mod:`.carry`), the spec stored in checkpoints (:mod:`.spec`), applying or replaying it (:mod:`.apply`)
and folding (:mod:`.fold`).
"""

from normlightning.injection.apply import inject, mark_pretrained, restore_injection
from normlightning.injection.fold import fold_norms
from normlightning.injection.plan import format_summary
from normlightning.injection.rules import InjectionRules
from normlightning.injection.spec import get_spec, store_injection

__all__ = [
    "InjectionRules",
    "fold_norms",
    "format_summary",
    "get_spec",
    "inject",
    "mark_pretrained",
    "restore_injection",
    "store_injection",
]
