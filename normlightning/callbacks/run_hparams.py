"""RunHyperparameters: what makes runs comparable, logged as hyperparameters (the ``hparams:`` section).

At ``setup`` (after the ``norm:`` injection, before Lightning writes ``hparams.yaml``) it adds two
groups to the task's own hyperparameters, in plain YAML types (``yaml.safe_load`` reads the file):

- ``norm``: the normalization the run really uses, from the applied injection spec
  (:mod:`normlightning.injection.spec`) and the ``norm:`` settings::

      norm: {method: bgn, layers: 4, groups: {num_groups: 256},
             args: {bgn: {num_groups: 256, eps: 1.0e-05, momentum: 0.1, affine: true}},
             virtual_devices: 1, num_groups_setting: auto, kwargs: {}, overrides: [], exclude: [],
             param_norm: null}

  ``method`` joins the methods of the replaced layers (``bgn+gn`` with an override); without an
  injection it names the model's own layer classes (``native:BatchNorm2d``). ``args`` holds, per
  method, every effective argument of its layers, read from the built layers (defaults included,
  e.g. ``gn``'s ``num_groups: 32`` when the settings gave none); ``groups`` the group counts among
  them (``norm_group_args``, merged over methods). A value that differs between layers (counts
  fitted per layer) is the distinct values in model order, comma-separated (``"16,8"``); the
  per-layer values are in the summary table and the checkpoint's injection spec. ``num_groups_setting``
  and ``kwargs`` are what the settings asked;
  ``effective`` holds the same values under fixed keys: every constructor argument of every registered
  method (:func:`norm_argument_names`), ``null`` where no replaced layer has it, so that every run
  logs the same keys; ``virtual_devices`` the ``k`` of the model's batch-statistic layers
  (``norm.virtual_devices``: statistics per ``B/k`` examples; 1 when no layer splits its batch);
- ``data``: ``{class: Digits, batch_size: 64, world_size: 1, global_batch_size: 64}``
  (``batch_size`` per process);
- ``run``: ``{seed: 0, max_epochs: 10, max_steps: -1, lr: 0.1, lr_scaled: 0.1}`` (``lr``: the optimizer's
  configured learning rate, ``lr_scaled``: after the task's linear scaling, ``lr_base_batch_size``).

TensorBoard's HParams tab takes its columns from the first run it reads, so the row logged there has the
same keys in every run: ``norm/args`` and ``norm/groups`` (whose keys depend on the method) are left out of
it (``norm/effective`` holds their values), ``norm/kwargs`` is one string, and the optimizer's switches
that do not change the math (:data:`OPTIMIZER_NOISE`) are dropped. ``hparams.yaml`` has everything.

In ``fit`` it also gives TensorBoard's HParams tab a metric, ``hp/best_<metric>`` (default: the
best ``val/acc1``, following the ``checkpoint:`` section's ``monitor`` and ``mode``), logged to
every logger after every validation, so that runs of several methods and batch sizes sit in one
table. (A ``TensorBoardLogger`` with ``default_hp_metric=True`` makes Lightning write an HParams
row of its own as well; the CLI's default logger, and any config that keeps its class, set it false.) Put it after
:class:`~normlightning.callbacks.norm_injection.NormInjection` in the callback list (the CLI does).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
from typing import Any, Literal

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from typing_extensions import override

from normlightning.callbacks.checkpoint import resolve_monitor
from normlightning.callbacks.norm_injection import NormInjection
from normlightning.injection.plan import layer_args
from normlightning.injection.rules import InjectionRules
from normlightning.injection.spec import get_spec
from normlightning.norms import BatchStatNorm, available_norms, norm_group_args
from normlightning.norms.model_walk import is_norm_layer
from normlightning.norms.registry import norm_factory
from normlightning.tasks.base import yaml_safe
from normlightning.training.lr_scaling import linear_lr_factor

__all__ = ["RunHyperparameters", "data_hparams", "norm_argument_names", "norm_hparams", "run_hparams"]

#: ``torch.optim`` constructor switches that choose an implementation, not the update: left out of the HParams row.
OPTIMIZER_NOISE = ("foreach", "fused", "differentiable", "maximize", "capturable")

#: Arguments every norm layer has that are not settings of the method (the layer's size and placement).
_LAYER_PLACEMENT = ("self", "num_features", "device", "dtype")

#: Keys LightningCLI adds to a task's hyperparameters for reloading; not hyperparameters of the run.
_CLI_KEYS = ("_class_path", "_instantiator")


def _ordered_unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _native_norms(model: nn.Module) -> str | None:
    """``native:<Class>+...`` of the normalization layers a model has of its own (``None``: none)."""
    names = _ordered_unique([type(m).__name__ for _, m in model.named_modules() if is_norm_layer(m)])
    return "native:" + "+".join(names) if names else None


def _compact(values: list[Any]) -> Any:
    """One value when all agree, else the distinct values in model order joined by commas (``"16,256"``)."""
    distinct = _ordered_unique(values)
    return distinct[0] if len(distinct) == 1 else ",".join(str(v) for v in distinct)


def _effective_values(model: nn.Module, layers: list[dict[str, Any]]) -> dict[str, dict[str, list[Any]]]:
    """``{method: {argument: [value per layer]}}``: every effective argument of the replaced layers, read
    from the built layers (:func:`~normlightning.injection.plan.layer_args`), ``num_features`` aside."""
    seen: dict[str, dict[str, list[Any]]] = {}
    for record in layers:
        per_method = seen.setdefault(record["method"], {})
        for name, value in layer_args(model, record).items():
            if name != "num_features":
                per_method.setdefault(name, []).append(value)
    return seen


def _group_counts(values: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """The group counts each method declares (``norm_group_args``), merged over methods:
    ``{arg: value}``, or ``{arg: "16,256"}`` when layers differ."""
    seen: dict[str, list[Any]] = {}
    for method, per_arg in values.items():
        for arg in norm_group_args(method):
            if arg.name in per_arg:
                seen.setdefault(arg.name, []).extend(per_arg[arg.name])
    return {name: _compact(counts) for name, counts in seen.items()}


def norm_argument_names() -> list[str]:
    """Sorted names of the constructor arguments of every registered method, ``num_features`` and placement aside
    (``affine``, ``eps``, ``momentum``, ``num_groups``, ``channel_groups``, ``mean``, ``std``, ...)."""
    names: set[str] = set()
    for method in available_norms():
        factory = norm_factory(method)
        try:
            parameters = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # a plugin factory without a signature
            continue
        names.update(
            p.name
            for p in parameters
            if p.name not in _LAYER_PLACEMENT and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )
    return sorted(names)


def _virtual_devices(model: nn.Module) -> int | str:
    """``virtual_devices`` of ``model``'s layers with batch statistics, read from the layers: one value,
    ``"1,4"`` when they differ, 1 when there are none."""
    values = _ordered_unique(
        [m.virtual_devices for m in model.modules() if isinstance(m, BatchStatNorm) and m.uses_batch_statistics]
    )
    if not values:
        return 1
    return values[0] if len(values) == 1 else ",".join(str(v) for v in values)


def norm_hparams(model: nn.Module, spec: dict[str, Any] | None, rules: InjectionRules | None) -> dict[str, Any]:
    """The ``norm`` hyperparameters of a run: the applied ``spec`` on ``model`` and the ``rules`` it came from."""
    layers = list((spec or {}).get("layers", []))
    method = "+".join(_ordered_unique([r["method"] for r in layers])) if layers else _native_norms(model)
    params = (spec or {}).get("param_norms", [])
    values = _effective_values(model, layers)
    args = {m: {name: _compact(v) for name, v in per_arg.items()} for m, per_arg in values.items()}
    merged: dict[str, list[Any]] = {}
    for per_arg in values.values():
        for name, per_layer in per_arg.items():
            merged.setdefault(name, []).extend(per_layer)
    names = sorted(set(norm_argument_names()) | set(merged))
    effective = {name: _compact(merged[name]) if name in merged else None for name in names}
    out: dict[str, Any] = {
        "method": method,
        "layers": len(layers),
        "groups": _group_counts(values),
        "args": args,
        "effective": effective,
    }
    out["virtual_devices"] = _virtual_devices(model)
    if rules is not None:
        out.update(
            num_groups_setting=rules.num_groups,
            kwargs=dict(rules.kwargs),
            overrides=[{**o, "pattern": o["pattern"].pattern} for o in rules.overrides],
            exclude=[p.pattern for p in rules.exclude],
        )
    out["param_norm"] = params[0]["kind"] if params else None
    return yaml_safe(out)


def data_hparams(datamodule: Any, world_size: int) -> dict[str, Any]:
    """The ``data`` hyperparameters: class name, per-process and global batch size."""
    batch_size = getattr(datamodule, "batch_size", None)
    batch_size = batch_size if isinstance(batch_size, int) and not isinstance(batch_size, bool) else None
    return {
        "class": type(datamodule).__name__ if datamodule is not None else None,
        "batch_size": batch_size,
        "world_size": world_size,
        "global_batch_size": batch_size * world_size if batch_size is not None else None,
    }


def run_hparams(trainer: Trainer, pl_module: LightningModule, batch_size: int | None) -> dict[str, Any]:
    """The ``run`` hyperparameters: the global seed (``PL_GLOBAL_SEED``, set by ``seed_everything``), the
    training length, and the optimizer's configured and linearly scaled learning rate. The configured ``lr`` is
    read from an optimizer that the task's ``optimizer_factory`` builds over a stand-in parameter (the default
    optimizer's too); ``None`` for a task without one."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    factory = getattr(pl_module, "optimizer_factory", None)
    lr = factory([torch.nn.Parameter(torch.zeros(1))]).defaults.get("lr") if callable(factory) else None
    lr = float(lr) if isinstance(lr, (int, float)) else None
    lr_scaled = lr
    base = getattr(pl_module, "lr_base_batch_size", None)
    if lr is not None and base is not None and batch_size is not None:
        lr_scaled = lr * linear_lr_factor(batch_size, trainer.world_size, base)
    return {
        "seed": int(seed) if seed is not None else None,
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "lr": lr,
        "lr_scaled": lr_scaled,
    }


def hparams_row(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` for TensorBoard's HParams tab: the same keys in every run (see the module docstring)."""
    row = copy.deepcopy(params)
    norm = row.get("norm", {})
    norm.pop("args", None)
    norm.pop("groups", None)
    if "kwargs" in norm:
        norm["kwargs"] = yaml.safe_dump(norm["kwargs"], default_flow_style=True, width=10**6).strip()
    optimizer = row.get("optimizer")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("init_args"), dict):
        optimizer["init_args"] = {k: v for k, v in optimizer["init_args"].items() if k not in OPTIMIZER_NOISE}
    return row


class RunHyperparameters(Callback):
    """Log the run's normalization and data settings as hyperparameters and a best-metric for HParams.

    Args:
        metric: the metric whose best value goes to the HParams tab as ``hp/best_<metric>``;
            default: the ``checkpoint:`` section's ``monitor`` (by default the task's, ``val/acc1``).
        mode: ``max`` or ``min``; default: the checkpoint's ``mode``.

    Attributes:
        params: the ``{"norm": ..., "data": ...}`` hyperparameters logged at the last ``setup``.
        best: the best value of ``metric`` so far in ``fit`` (``nan`` before the first validation).
    """

    def __init__(self, metric: str | None = None, mode: Literal["max", "min"] | None = None) -> None:
        if mode not in (None, "max", "min"):
            raise ValueError(f"hparams.mode must be 'max', 'min' or null, got {mode!r}")
        self.metric = metric
        self.mode = mode
        self._metric, self._mode = metric, mode or "max"
        self.params: dict[str, Any] = {}
        self.best = math.nan

    @property
    def tag(self) -> str | None:
        """The HParams metric's name, ``hp/best_<metric>`` (``None`` without a metric)."""
        return f"hp/best_{self._metric}" if self._metric else None

    def _resolve_metric(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        # the checkpoint resolves monitor="task" at its own setup, which Lightning runs after this one's
        self._metric = self.metric or resolve_monitor(getattr(checkpoint, "monitor", None), pl_module)
        self._mode = self.mode or getattr(checkpoint, "mode", None) or "max"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._resolve_metric(trainer, pl_module)
        injection = next((c for c in trainer.callbacks if isinstance(c, NormInjection)), None)
        data = data_hparams(getattr(trainer, "datamodule", None), trainer.world_size)
        self.params = {
            "norm": norm_hparams(pl_module, get_spec(pl_module), injection.rules if injection else None),
            "data": data,
            "run": run_hparams(trainer, pl_module, data["batch_size"]),
        }
        for logger in trainer.loggers:
            if stage == "fit" and self.tag is not None and isinstance(logger, TensorBoardLogger):
                # the HParams row: the task's (and data module's) hyperparameters too, as Lightning logs them,
                # with the same keys in every run; hparams.yaml (the logger's ``hparams``) gets everything
                full = {**self._own_hparams(trainer, pl_module), **self.params}
                logger.log_hyperparams(hparams_row(full), metrics={self.tag: self.best})
                logger.hparams.update(full)
            else:
                logger.log_hyperparams(self.params)

    @staticmethod
    def _own_hparams(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        merged = {**(datamodule.hparams_initial if datamodule is not None else {}), **pl_module.hparams_initial}
        return yaml_safe({k: v for k, v in merged.items() if k not in _CLI_KEYS})

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.tag is None or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self._metric)
        if value is None:
            return
        value = float(value)
        better = value > self.best if self._mode == "max" else value < self.best
        if math.isnan(self.best) or better:
            self.best = value
        for logger in trainer.loggers:
            logger.log_metrics({self.tag: self.best}, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict.get("best", math.nan))
