"""NormInjection: rewrite a model's normalization layers from the config, at ``setup``.

In a config (the CLI exposes the callback as the top-level ``norm:`` section)::

    norm:
      method: bgn             # any name of normlightning.norms.available_norms(); null = leave the model as is
      num_groups: auto        # int, or auto (bgn / ghost / seqnorm, from the per-process batch size)
      kwargs: {eps: 1.0e-5}   # further build_norm keyword arguments for `method`
      overrides:              # first regex (re.fullmatch on the module name) that matches wins
        - {pattern: 'backbone\\.layer4\\..*', method: gn, num_groups: 32}
        - {pattern: 'backbone\\.bn1', method: null}      # method: null keeps this layer
      exclude: ['backbone\\.fc_norm']                   # also kept as they are
      group_fit: error        # or nearest
      sync: null              # null: follow trainer.sync_batchnorm; true/false: all-reduce batch stats or not

Timing (Lightning 2.x ``Trainer._run``): ``Callback.setup`` runs before the checkpoint is restored,
before the strategy moves/wraps the model (DDP, ``sync_batchnorm``) and before
``configure_optimizers``; so the restored weights, the DDP wrapper and the optimizer all see the
new layers.  It runs once per process and is idempotent across stages: a model that already
carries an applied spec is left alone.

For every target layer (default: ``BatchNorm1d/2d/3d``) the replacement is
``build_norm(method, num_features, **kwargs)`` where ``num_features`` is the old layer's channel
count and ``kwargs`` are, in increasing priority: the old layer's ``eps`` and ``affine`` (and its
``momentum`` when it is not PyTorch's default 0.1 and the new layer keeps running statistics;
otherwise the method's own default momentum holds), the global ``num_groups``/``kwargs``, and the
matching override's keys.  Affine parameters and running statistics are copied where
their shapes agree (running statistics only between buffers of the same name, e.g.
``running_mean``).  The applied spec (see :mod:`normlightning.callbacks.injection_spec`) goes into
every checkpoint, so ``Task.load_from_checkpoint(path)`` rebuilds the layers without the callback.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from normlightning.callbacks import group_rules
from normlightning.callbacks.injection_spec import (
    CHECKPOINT_KEY,
    SPEC_VERSION,
    apply_param_norm,
    build_layer,
    get_spec,
    install_layer,
    set_spec,
)
from normlightning.callbacks.norm_sync import set_statistics_sync, trainer_syncs_batchnorm
from normlightning.norms import AutoContext, GroupArg, norm_group_args

DEFAULT_TARGETS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
DEFAULT_PARAM_NORM_TARGETS = ("Conv1d", "Conv2d", "Conv3d")
TORCH_DEFAULT_MOMENTUM = 0.1

def _resolve_type(name: str) -> type:
    """``"BatchNorm2d"`` -> ``torch.nn.BatchNorm2d``; ``"pkg.mod.Cls"`` -> that class."""
    if "." not in name:
        cls = getattr(nn, name, None)
    else:
        import importlib

        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            cls = None
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(
            f"norm target type {name!r} is not a torch.nn module class; use a torch.nn class name such as "
            f"'BatchNorm2d', 'GroupNorm', 'LayerNorm', 'InstanceNorm2d', or a dotted path 'package.module.Class'"
        )
    return cls


def _num_features(layer: nn.Module, name: str) -> int:
    """Channel count of a native norm layer (BatchNorm / InstanceNorm / GroupNorm / 1-D LayerNorm)."""
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    if isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1:
            raise ValueError(
                f"layer {name!r}: LayerNorm over {tuple(layer.normalized_shape)} cannot be replaced (only a "
                f"LayerNorm over the last axis of (N, C) inputs can); exclude it with norm.exclude"
            )
        return int(layer.normalized_shape[0])
    if hasattr(layer, "num_features"):
        return int(layer.num_features)
    raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no channel count; exclude it with norm.exclude")


def _old_affine(layer: nn.Module) -> bool:
    return bool(getattr(layer, "affine", getattr(layer, "elementwise_affine", True)))


def probe_input_shapes(
    model: nn.Module, example_input: Any, names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    """Input shape of each named submodule in one no-grad, eval-mode forward of ``example_input``.

    ``example_input`` is a tensor, a tuple of positional arguments or a dict of keyword arguments
    (as ``LightningModule.example_input_array``).  The model's train/eval modes are restored.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def hook(_module: nn.Module, args: tuple, _name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(_name, tuple(args[0].shape))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")

    def to_device(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**{k: to_device(v) for k, v in example_input.items()})
            elif isinstance(example_input, tuple):
                model(*(to_device(v) for v in example_input))
            else:
                model(to_device(example_input))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


class NormInjection(Callback):
    """Replace the model's normalization layers with ``normlightning.norms`` layers at ``setup``.

    Args:
        method: registry name for the replacement (``bn gn ln in pn ghost seqnorm bgn gbgn hn sn brn``
            or a registered plugin); ``None`` leaves every layer as it is (overrides may still name
            a method for some layers).
        num_groups: the method's group count (``bgn``: groups of ``D = C*H*W``; ``gn``/``gbgn``:
            channel groups; ``ghost``: ghost batches) or ``"auto"`` (``bgn``: paper mapping from the
            per-process batch size, fitted to each layer; ``ghost``: ghost batches of >= 16
            examples; ``seqnorm``: ``auto`` for both its counts). ``None``: the method's default.
        kwargs: further keyword arguments for ``build_norm(method, num_features, **kwargs)``.
            ``seqnorm`` takes ``channel_groups``/``batch_groups`` here (each may be ``auto``).
        targets: layer classes to replace (``torch.nn`` names or dotted paths).
        overrides: list of ``{pattern: regex, method?: name|None, <kwarg>: value, ...}``; the first
            whose ``pattern`` fully matches the module name wins.  Its ``method`` (when given)
            replaces the global one (``None`` keeps the layer); its other keys update the kwargs
            (merged over the global ones when the method is the same, alone otherwise).
        exclude: regexes (``re.fullmatch`` on the module name) of target layers to keep.
        group_fit: ``"error"`` (default) when a configured group count does not divide what it
            must (the message names the layer), or ``"nearest"``: the largest valid count at or
            below the request.  ``auto`` counts are always fitted.  Changes show in the summary.
        batch_size: per-process batch size for ``auto``; default ``trainer.datamodule.batch_size``.
        copy_state: copy affine parameters and running statistics from the replaced layers.
        weight_standardization: apply WS to every ``param_norm_targets`` layer (not with weight_norm).
        weight_norm: apply weight normalization to every ``param_norm_targets`` layer.
        param_norm_targets: layer classes that get WS / WN.
        param_norm_exclude: regexes of those layers to leave alone (e.g. the classifier).
        sync: all-reduce the batch statistics of the injected batch layers across processes while
            training (``True``), keep them per process (``False``), or follow
            ``trainer.sync_batchnorm`` (``None``, default).  Per-process is the papers' setting.
        log_summary: print the summary table (rank 0) and log it to TensorBoard as text.
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
        param_norm_targets: list[str] | None = None,
        param_norm_exclude: list[str] | None = None,
        sync: bool | None = None,
        log_summary: bool = True,
    ) -> None:
        super().__init__()
        if group_fit not in group_rules.FIT_POLICIES:
            raise ValueError(f"norm.group_fit must be one of {group_rules.FIT_POLICIES}, got {group_fit!r}")
        if weight_standardization and weight_norm:
            raise ValueError("norm.weight_standardization and norm.weight_norm are exclusive; set at most one")
        if num_groups is not None and not (isinstance(num_groups, str) and (num_groups == "auto" or num_groups.startswith("auto:"))) and (
            isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
        ):
            raise ValueError(f"norm.num_groups must be a positive int, 'auto', 'auto:<policy>' or null, got {num_groups!r}")
        self.method = method
        self.num_groups = num_groups
        self.kwargs = dict(kwargs or {})
        self.targets = tuple(targets) if targets is not None else DEFAULT_TARGETS
        self.target_types = tuple(_resolve_type(t) for t in self.targets)
        self.overrides = [self._check_override(i, o) for i, o in enumerate(overrides or [])]
        self.exclude = [self._compile(p, "norm.exclude") for p in (exclude or [])]
        self.group_fit = group_fit
        self.batch_size = batch_size
        self.copy_state = copy_state
        self.param_norm = (
            "weight_standardization" if weight_standardization else "weight_norm" if weight_norm else None
        )
        names = param_norm_targets if param_norm_targets is not None else DEFAULT_PARAM_NORM_TARGETS
        self.param_norm_types = tuple(_resolve_type(t) for t in names)
        self.param_norm_exclude = [self._compile(p, "norm.param_norm_exclude") for p in (param_norm_exclude or [])]
        self.sync = sync
        self.log_summary = log_summary
        self.summary_rows: list[dict[str, str]] = []
        self.spec: dict[str, Any] | None = None

    # ------------------------------------------------------------------ config checks
    @staticmethod
    def _compile(pattern: str, setting: str) -> re.Pattern:
        try:
            return re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{setting}: {pattern!r} is not a valid regular expression ({err})") from err

    def _check_override(self, index: int, override: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(override, Mapping) or "pattern" not in override:
            raise ValueError(
                f"norm.overrides[{index}] must be a mapping with a 'pattern' key, e.g. "
                f"{{pattern: 'layer4\\\\..*', method: gn, num_groups: 32}}; got {override!r}"
            )
        out = dict(override)
        out["pattern"] = self._compile(out["pattern"], f"norm.overrides[{index}].pattern")
        return out

    # ------------------------------------------------------------------ planning
    def _rule_for(self, name: str) -> tuple[str | None, dict[str, Any], str]:
        """(method, requested kwargs, reason) for module ``name``; method None = keep."""
        if any(p.fullmatch(name) for p in self.exclude):
            return None, {}, "excluded"
        base = dict(self.kwargs)
        if self.num_groups is not None:
            base["num_groups"] = self.num_groups
        method, kwargs, reason = self.method, base, "global"
        for i, ov in enumerate(self.overrides):
            if ov["pattern"].fullmatch(name):
                extra = {k: v for k, v in ov.items() if k not in ("pattern", "method")}
                if "method" in ov and ov["method"] != self.method:
                    method, kwargs = ov["method"], extra
                else:
                    kwargs = {**base, **extra}
                reason = f"override {i}"
                break
        if method is not None:
            try:
                declared = norm_group_args(method)
            except ValueError as err:
                raise ValueError(f"norm: cannot build {method!r} for layer {name!r}: {err}") from None
            if "num_groups" in kwargs:
                kwargs = _route_num_groups(method, declared, kwargs)
        return method, kwargs, reason

    def _needs_flat_size(self, method: str) -> bool:
        return any(arg.divides == "flat" for arg in norm_group_args(method))

    def _resolve_batch_size(self, trainer: Trainer | None) -> int:
        if self.batch_size is not None:
            return self.batch_size
        bs = getattr(getattr(trainer, "datamodule", None), "batch_size", None) if trainer is not None else None
        if not isinstance(bs, int):
            raise ValueError(
                "norm: an `auto` group count needs the per-process batch size; set norm.batch_size or use a "
                "DataModule with a `batch_size` attribute"
            )
        return bs

    def _resolve_groups(
        self,
        name: str,
        method: str,
        kwargs: dict[str, Any],
        num_features: int,
        input_shape: tuple[int, ...] | None,
        trainer: Trainer | None,
    ) -> list[str]:
        """Replace ``auto`` and fit the method's declared group counts in ``kwargs`` (in place);
        return notes for the summary."""
        notes: list[str] = []
        spatial = None
        if input_shape is not None:
            spatial = 1
            for s in input_shape[2:]:
                spatial *= int(s)
        for arg in norm_group_args(method):
            value = kwargs.get(arg.name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "auto" and not value.startswith("auto:"):
                    raise ValueError(f"layer {name!r}: {method} {arg.name}={value!r}; give an int, 'auto' or 'auto:<policy>'")
                if not arg.auto:
                    raise ValueError(f"layer {name!r}: {method} {arg.name} has no 'auto' rule; give it an int")
                batch = self._resolve_batch_size(trainer)
                _, rule = arg.auto_rule(value.partition(":")[2] or None)
                if arg.divides == "flat" and spatial is None:
                    raise ValueError(self._probe_message(name, arg.name))
                requested = rule(AutoContext(batch, num_features, spatial))
                notes.append(f"{arg.name} {value}->{requested} (B={batch})")
                if arg.divides == "batch":
                    kwargs[arg.name] = requested
                    continue
                policy = "nearest"
            else:
                if arg.divides == "batch":
                    continue
                requested, policy = value, self.group_fit
            if arg.divides == "channels":
                total, what = num_features, f"C={num_features}"
            else:
                if spatial is None:
                    raise ValueError(self._probe_message(name, arg.name))
                total = num_features * spatial
                what = f"D=C*S={num_features}*{spatial}={total}"
            kwargs[arg.name], note = group_rules.fit_groups(
                requested, total, policy=policy, layer=name, arg=arg.name, what=what
            )
            if note:
                notes.append(note)
        return notes

    @staticmethod
    def _probe_message(name: str, arg: str) -> str:
        return (
            f"layer {name!r}: fitting {arg} needs the layer's input size D=C*H*W; give the "
            f"LightningModule an `example_input_array` (ClassificationTask sets it from input_shape)"
        )

    def plan(
        self,
        model: nn.Module,
        *,
        example_input: Any = None,
        trainer: Trainer | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Decide the replacements for ``model``: ``(spec, summary_rows)``; changes nothing."""
        candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, self.target_types)]
        rules = {n: self._rule_for(n) for n, _ in candidates}
        needs_probe = any(meth is not None and self._needs_flat_size(meth) for meth, _, _ in rules.values())
        shapes: dict[str, tuple[int, ...]] = {}
        if needs_probe and example_input is not None:
            shapes = probe_input_shapes(model, example_input, [n for n, _ in candidates])
        layers, rows = [], []
        for name, old in candidates:
            method, requested, reason = rules[name]
            if method is None:
                rows.append({"layer": name, "old": type(old).__name__, "new": "(kept)", "args": reason})
                continue
            num_features = _num_features(old, name)
            kwargs: dict[str, Any] = {"eps": float(getattr(old, "eps", 1e-5)), "affine": _old_affine(old)}
            kwargs.update(copy.deepcopy(requested))
            notes = self._resolve_groups(name, method, kwargs, num_features, shapes.get(name), trainer)
            record = {"name": name, "old_type": type(old).__name__, "method": method,
                      "kwargs": {"num_features": num_features, **kwargs}}
            probe = self._build_checked(record)
            momentum = getattr(old, "momentum", TORCH_DEFAULT_MOMENTUM)
            if probe.uses_batch_statistics and "momentum" not in kwargs and momentum != TORCH_DEFAULT_MOMENTUM:
                record["kwargs"]["momentum"] = momentum  # the model chose it; keep it
                probe = self._build_checked(record)
            layers.append(record)
            args = ", ".join(f"{k}={v}" for k, v in record["kwargs"].items())
            if reason != "global":
                notes.insert(0, reason)
            rows.append({"layer": name, "old": type(old).__name__,
                         "new": f"{type(probe).__name__} ({method})",
                         "args": args + (f"  [{'; '.join(notes)}]" if notes else "")})
        param_norms = []
        if self.param_norm is not None:
            for name, module in model.named_modules():
                if name and isinstance(module, self.param_norm_types) and not any(
                    p.fullmatch(name) for p in self.param_norm_exclude
                ):
                    param_norms.append({"name": name, "kind": self.param_norm})
                    rows.append({"layer": name, "old": type(module).__name__,
                                 "new": f"{type(module).__name__} + {self.param_norm}", "args": ""})
        for setting, patterns in (("norm.exclude", self.exclude),
                                  ("norm.overrides", [o["pattern"] for o in self.overrides])):
            for p in patterns:
                if not any(p.fullmatch(n) for n, _ in candidates):
                    warnings.warn(f"{setting}: pattern {p.pattern!r} matches no target layer", stacklevel=2)
        spec = {"version": SPEC_VERSION, "layers": layers, "param_norms": param_norms}
        return spec, rows

    @staticmethod
    def _build_checked(record: dict[str, Any]) -> nn.Module:
        """Build one layer now (validates its kwargs), naming the layer when ``build_norm`` refuses."""
        try:
            layer = build_layer(record)
        except (ValueError, TypeError) as err:
            raise type(err)(f"norm: cannot build {record['method']!r} for layer {record['name']!r}: {err}") from err
        if not hasattr(layer, "uses_batch_statistics"):
            layer.uses_batch_statistics = False  # a plugin layer outside the NormLayer hierarchy
        return layer

    # ------------------------------------------------------------------ applying
    def inject(self, model: nn.Module, *, example_input: Any = None, trainer: Trainer | None = None) -> dict:
        """Plan and apply the replacements to ``model`` (copying state when ``copy_state``); return the spec."""
        existing = get_spec(model)
        if existing is not None:
            return existing
        spec, rows = self.plan(model, example_input=example_input, trainer=trainer)
        for rec in spec["layers"]:
            old = model.get_submodule(rec["name"])
            new = build_layer(rec)
            if self.copy_state:
                copy_matching_state(old, new)
            install_layer(model, rec["name"], new)
        for rec in spec["param_norms"]:
            apply_param_norm(model.get_submodule(rec["name"]), rec["kind"])
        set_spec(model, spec)
        self.spec, self.summary_rows = spec, rows
        return spec

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Inject (once per process; idempotent across stages), print and log the summary."""
        nothing_to_do = self.method is None and not self.overrides and self.param_norm is None
        if get_spec(pl_module) is None:
            if not nothing_to_do:
                self.inject(pl_module, example_input=pl_module.example_input_array, trainer=trainer)
                if self.log_summary:
                    self._report(trainer)
        elif self.spec is None:
            self.spec = get_spec(pl_module)
            rank_zero_info("NormInjection: the model already carries injected layers (from a checkpoint); left as is")
        if self._sync_enabled(trainer):
            n = set_statistics_sync(pl_module, True)
            if self.sync is None and stage == "fit":
                rank_zero_info(
                    f"NormInjection: trainer.sync_batchnorm=True -> all-reducing the batch statistics of {n} "
                    "normlightning layer(s) too (set norm.sync=false to keep them per process)"
                )

    def _sync_enabled(self, trainer: Trainer) -> bool:
        return self.sync if self.sync is not None else trainer_syncs_batchnorm(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # layers may have been rebuilt by a checkpoint restore after setup: (re)apply the sync flag
        if self._sync_enabled(trainer):
            set_statistics_sync(pl_module, True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._sync_enabled(trainer):
            set_statistics_sync(pl_module, False)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        spec = get_spec(pl_module)
        if spec is not None:
            checkpoint[CHECKPOINT_KEY] = copy.deepcopy(spec)

    # ------------------------------------------------------------------ reporting
    def summary_table(self) -> str:
        """The last summary as a Markdown table (layer | old type | new type | effective args)."""
        return format_summary(self.summary_rows)

    def _report(self, trainer: Trainer) -> None:
        table = self.summary_table()
        n_new = len(self.spec["layers"]) if self.spec else 0
        rank_zero_info(f"NormInjection: replaced {n_new} layer(s)\n{table}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.add_text("norm_injection/summary", table, global_step=trainer.global_step)


def _route_num_groups(method: str, declared: Sequence[GroupArg], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move the ``num_groups`` setting onto the group counts that ``method`` declares with
    ``takes_num_groups`` (``gbgn``: ``channel_groups``; ``seqnorm``: both its counts, ``auto`` only)."""
    kwargs = dict(kwargs)
    value = kwargs.pop("num_groups")
    targets = [arg.name for arg in declared if arg.takes_num_groups]
    if not targets:
        raise ValueError(f"norm.num_groups={value!r}: {method} takes no group count; remove num_groups for it")
    if len(targets) > 1 and not (isinstance(value, str) and value.startswith("auto")):
        raise ValueError(
            f"{method} takes {' and '.join(targets)} in norm.kwargs, not num_groups; num_groups: auto sets each to auto"
        )
    for target in targets:
        kwargs.setdefault(target, value)
    return kwargs


def copy_matching_state(old: nn.Module, new: nn.Module) -> list[str]:
    """Copy ``weight``/``bias`` and same-named buffers from ``old`` to ``new`` where shapes agree.

    Returns the names copied.  Buffers are matched by name (``running_mean``, ``running_var``,
    ``num_batches_tracked``), so statistics with another meaning (per-group, raw moments) are not
    mixed up with BN's per-channel ones.
    """
    copied = []
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src, dst = getattr(old, pname, None), getattr(new, pname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                copied.append(pname)
        new_buffers = dict(new.named_buffers(recurse=False))
        for bname, src in old.named_buffers(recurse=False):
            dst = new_buffers.get(bname)
            if src is not None and dst is not None and src.shape == dst.shape:
                dst.copy_(src)
                copied.append(bname)
    return copied


def format_summary(rows: Sequence[Mapping[str, str]]) -> str:
    """Rows ``{layer, old, new, args}`` as a Markdown table (TensorBoard renders it)."""
    header = ("layer", "old type", "new type", "effective args")
    body = [(r["layer"], r["old"], r["new"], r["args"]) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)
