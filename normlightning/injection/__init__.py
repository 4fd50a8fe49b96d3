"""Model surgery: rewrite any ``nn.Module``'s normalization layers (plain PyTorch, no Lightning).

``inject(model, method="gn", num_groups=32)`` plans and applies; the pieces: settings
(:mod:`.rules`), group counts (:mod:`.groups`), planning and the summary (:mod:`.plan`), modules
carried over from subclassed layers (:mod:`.carry`), the spec stored in checkpoints
(:mod:`.spec`), applying or replaying it (:mod:`.apply`) and, for inference, folding norm layers
into the convolutions before them (:mod:`.fold`).
"""

from normlightning.injection.apply import (
    apply_param_norm,
    apply_spec,
    copy_matching_state,
    inject,
    install_layer,
    mark_pretrained,
    pretrained_names,
    restore_injection,
)
from normlightning.injection.carry import NormWithCarried
from normlightning.injection.fold import fold_norms, inference_affine
from normlightning.injection.plan import format_summary, layer_args, plan_injection, probe_input_shapes, summary_rows
from normlightning.injection.rules import DEFAULT_TARGETS, InjectionRules
from normlightning.injection.spec import (
    CHECKPOINT_KEY,
    check_checkpoint_file,
    get_spec,
    read_checkpoint,
    same_layers,
    set_spec,
    store_injection,
    validate_spec,
)

__all__ = [
    "CHECKPOINT_KEY",
    "DEFAULT_TARGETS",
    "InjectionRules",
    "NormWithCarried",
    "apply_param_norm",
    "apply_spec",
    "check_checkpoint_file",
    "copy_matching_state",
    "fold_norms",
    "format_summary",
    "get_spec",
    "inference_affine",
    "inject",
    "install_layer",
    "layer_args",
    "mark_pretrained",
    "plan_injection",
    "pretrained_names",
    "probe_input_shapes",
    "read_checkpoint",
    "restore_injection",
    "same_layers",
    "set_spec",
    "store_injection",
    "summary_rows",
    "validate_spec",
]
