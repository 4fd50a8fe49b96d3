"""Inference example weighing: search ``alpha`` after training (Four Things §1).

Layers that support it (class attribute ``supports_example_weighing = True``:
normlightning's ``bn``, ``ghost``, ``gbgn``) mix, at inference, the population
statistics with the example's own statistics over its set without the batch axis::

    mu  = (1 - alpha) * mu_pop + alpha * mu_ex
    s   = (1 - alpha) * (var_pop + mu_pop^2) + alpha * E_ex[x^2]
    var = max(s - mu^2, 0)
    y   = (x - mu) / sqrt(var + eps)

(:func:`normlightning.norms.functional.example_weighted_norm`; the clamp at 0 guards against
float round-off, since for ``0 <= alpha <= 1`` the exact ``s - mu^2`` is never negative.)

``alpha = 0`` is plain inference. ``alpha`` needs no retraining; it is chosen on held-out
data. :func:`search_example_weighing` sets one shared ``alpha`` in every such layer for
each value of a grid, measures top-1 accuracy, and leaves the best one set.

The default grid (:func:`example_weighing_grid`) is ``0`` and the powers of two
``1/512, 1/256, ..., 1/2``; given the training batch size ``B`` of a normalization set
(the ghost-batch size for ``ghost``/``gbgn``, the per-process batch for ``bn``) it adds
``1/(2B), 1/B, 2/B``, since ``alpha ~ 1/B`` is the paper's natural starting point.
Ties go to the smallest ``alpha`` (closest to plain inference).

Persistence: every layer keeps its ``alpha`` in a buffer (``example_weighing_alpha``), so
it is part of the model's ``state_dict`` and ``Task.load_from_checkpoint`` restores it.
The :class:`ExampleWeighingSearch` callback also stores the chosen value and the per-alpha
table in its own checkpoint state, and re-applies it at the start of
``fit``/``validate``/``test``/``predict`` when resuming through the Trainer.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from normlightning.evaluation.accuracy import ForwardFn, TargetFn, evaluate_accuracy, trainer_dataloader
from normlightning.evaluation.progress import counted, loader_length, progress_bar, trainer_shows_progress

__all__ = [
    "DEFAULT_ALPHAS",
    "ExampleWeighingResult",
    "ExampleWeighingSearch",
    "example_weighing_grid",
    "example_weighing_layers",
    "search_example_weighing",
    "set_example_weighing_alpha",
]

#: 0 and 1/512, 1/256, ..., 1/2.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0,) + tuple(2.0**-k for k in range(9, 0, -1))


def example_weighing_grid(batch_size: int | None = None) -> list[float]:
    """The default grid of ``alpha`` values, sorted ascending, without duplicates.

    ``[0, 1/512, 1/256, ..., 1/2]``, plus ``1/(2B), 1/B, 2/B`` (clipped to ``[0, 1]``) when
    the training batch size ``B`` of a normalization set is given.
    """
    grid = set(DEFAULT_ALPHAS)
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"example_weighing_grid: batch_size must be a positive int or None, got {batch_size!r}")
        grid.update(min(1.0, f / batch_size) for f in (0.5, 1.0, 2.0))
    return sorted(grid)


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if not values:
        raise ValueError("example weighing: `alphas` is empty; give at least one value in [0, 1]")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise ValueError(f"example weighing: every alpha must lie in [0, 1], got {bad}")
    return sorted(set(values))


def example_weighing_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified_name: layer}`` of every module whose class has ``supports_example_weighing = True``."""
    return {
        name: m for name, m in model.named_modules() if getattr(type(m), "supports_example_weighing", False) is True
    }


def set_example_weighing_alpha(model: nn.Module, alpha: float | dict[str, float]) -> dict[str, nn.Module]:
    """Set ``layer.alpha`` in every example-weighing layer; return those layers.

    ``alpha`` is one float for all layers, or ``{layer_name: alpha}`` (names not in the
    model raise a ``ValueError``).
    """
    layers = example_weighing_layers(model)
    if isinstance(alpha, dict):
        unknown = sorted(set(alpha) - set(layers))
        if unknown:
            raise ValueError(
                f"set_example_weighing_alpha: no example-weighing layer named {unknown}; have {sorted(layers)}"
            )
        for name, value in alpha.items():
            layers[name].alpha = _check_alphas([value])[0]
    else:
        value = _check_alphas([alpha])[0]
        for layer in layers.values():
            layer.alpha = value
    return layers


@dataclass
class ExampleWeighingResult:
    """Outcome of :func:`search_example_weighing`.

    Attributes:
        alphas: the grid, ascending.
        accuracies: top-1 accuracy for each alpha (same order).
        best_alpha: argmax of accuracy (smallest alpha on ties), now set in the model.
        best_accuracy: its accuracy.
        layers: names of the layers that were set.
    """

    alphas: list[float]
    accuracies: list[float]
    best_alpha: float
    best_accuracy: float
    layers: list[str] = field(default_factory=list)

    def table(self) -> list[dict[str, float]]:
        """Rows ``{"alpha": a, "accuracy": acc}``, one per grid point."""
        return [{"alpha": a, "accuracy": acc} for a, acc in zip(self.alphas, self.accuracies)]

    def to_markdown(self) -> str:
        """A markdown table ``| alpha | accuracy |``, the best row marked with ``*``."""
        lines = ["| alpha | accuracy |", "|---:|---:|"]
        for a, acc in zip(self.alphas, self.accuracies):
            mark = " *" if a == self.best_alpha else ""
            lines.append(f"| {a:.6g}{mark} | {acc:.4f} |")
        return "\n".join(lines)


def search_example_weighing(
    model: nn.Module,
    dataloader: Iterable[Any],
    alphas: Sequence[float] | None = None,
    forward_fn: ForwardFn | None = None,
    target_fn: TargetFn | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    below_main_bar: bool = False,
) -> ExampleWeighingResult:
    """Grid-search one shared ``alpha`` for every example-weighing layer by top-1 accuracy.

    Args:
        model: contains at least one layer with ``supports_example_weighing = True``.
        dataloader: held-out (validation) batches, iterated once per alpha.
        alphas: grid in ``[0, 1]``; default :func:`example_weighing_grid` ``(batch_size)``.
        forward_fn: ``(model, batch) -> logits (N, num_classes)``; default ``model(batch[0])``.
        target_fn: ``batch -> targets (N,)``; default ``batch[1]``.
        batch_size: training batch size of a normalization set, adds ``1/B``-centred points
            to the default grid (ignored when ``alphas`` is given).
        progress: draw a progress bar over all evaluated batches (every alpha), with the last
            alpha and its accuracy (:mod:`normlightning.evaluation.progress`).
        below_main_bar: draw it below Lightning's training bar (inside ``fit``).

    Returns:
        :class:`ExampleWeighingResult`; the best alpha is left set in the model.
    """
    layers = example_weighing_layers(model)
    if not layers:
        raise ValueError(
            "search_example_weighing: the model has no layer with supports_example_weighing=True "
            "(normlightning's bn, ghost and gbgn support it; native torch BatchNorm does not). "
            "Inject one of those layers first."
        )
    grid = _check_alphas(alphas) if alphas is not None else example_weighing_grid(batch_size)
    per_alpha = loader_length(dataloader)
    bar = progress_bar(
        "Example weighing",
        per_alpha * len(grid) if per_alpha is not None else None,
        progress,
        below_main_bar=below_main_bar,
    )
    accuracies = []
    try:
        for alpha in grid:
            set_example_weighing_alpha(model, alpha)
            accuracies.append(evaluate_accuracy(model, counted(dataloader, bar), forward_fn, target_fn))
            bar.set_postfix(alpha=f"{alpha:.4g}", acc=f"{accuracies[-1]:.4f}")
    finally:
        bar.close()
    best = max(range(len(grid)), key=lambda i: (accuracies[i], -i))
    set_example_weighing_alpha(model, grid[best])
    return ExampleWeighingResult(grid, accuracies, grid[best], accuracies[best], sorted(layers))


class ExampleWeighingSearch(Callback):
    """Search the example-weighing ``alpha`` on the validation data and keep it.

    When it runs:
      - ``on_fit_end`` (``search_on_fit_end=True``): after training, on the validation
        loader; then, if ``save_checkpoint`` is True, writes ``example_weighing.ckpt``
        next to the other checkpoints (the ModelCheckpoint's folder, else
        ``<log_dir>/checkpoints``) so the chosen alpha lives in a checkpoint.
      - ``on_test_start`` (``search_on_test_start=True``): when no alpha is known yet
        (none searched in this process and none restored from the checkpoint), search on
        the validation loader before testing. So ``normlightning test --ckpt_path ...``
        with this callback evaluates the test set with the alpha chosen on validation data.
      - At the start of fit/validate/test/predict, a known alpha (searched or restored
        from the checkpoint's callback state) is applied to the layers.

    Args:
        alphas: the grid; default :func:`example_weighing_grid` ``(batch_size)``.
        batch_size: training batch size of a normalization set for the default grid.
        search_on_fit_end, search_on_test_start: see above.
        save_checkpoint: write ``example_weighing.ckpt`` after the fit-end search.
        forward_fn: ``(model, batch) -> logits``; default ``model(batch[0])``.

    Logged to every logger: ``example_weighing/acc@alpha=<a>`` per grid point,
    ``example_weighing/best_alpha`` and ``example_weighing/best_acc``; TensorBoard also
    gets the markdown table as text. Checkpoint state: ``{"alpha", "table"}``. While it runs, a
    progress bar (when the run shows Lightning's); then one line, e.g.
    ``ExampleWeighingSearch: best alpha 0.0625, val acc 0.9340 (alpha 0: 0.9120), 12 alphas in 4.2 s``.
    """

    def __init__(
        self,
        alphas: list[float] | None = None,
        batch_size: int | None = None,
        search_on_fit_end: bool = True,
        search_on_test_start: bool = True,
        save_checkpoint: bool = True,
        forward_fn: ForwardFn | None = None,
    ) -> None:
        self.alphas = _check_alphas(alphas) if alphas is not None else example_weighing_grid(batch_size)
        self.search_on_fit_end = search_on_fit_end
        self.search_on_test_start = search_on_test_start
        self.save_checkpoint = save_checkpoint
        self.forward_fn = forward_fn
        self.alpha: float | None = None
        self.table: list[dict[str, float]] = []
        self.checkpoint_path: str | None = None

    # state ----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.alpha is None:
            return {}
        return {"alpha": self.alpha, "table": [dict(row) for row in self.table]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "alpha" in state_dict:
            self.alpha = float(state_dict["alpha"])
            self.table = [dict(row) for row in state_dict.get("table", [])]

    # hooks ----------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(pl_module)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.alpha is None and self.search_on_test_start:
            self.search(trainer, pl_module)
        self._apply(pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.search_on_fit_end or trainer.interrupted:
            return
        if self.search(trainer, pl_module) is not None and self.save_checkpoint:
            self.checkpoint_path = os.path.join(_checkpoint_dir(trainer), "example_weighing.ckpt")
            trainer.save_checkpoint(self.checkpoint_path)

    # work -----------------------------------------------------------------------------
    def search(self, trainer: Trainer, pl_module: LightningModule) -> ExampleWeighingResult | None:
        """Run :func:`search_example_weighing` on the validation loader, log, remember the result."""
        if not example_weighing_layers(pl_module):
            rank_zero_warn("ExampleWeighingSearch: no layer supports example weighing (bn, ghost, gbgn); skipped.")
            return None
        loader = trainer_dataloader(trainer, "val")
        if loader is None:
            rank_zero_warn("ExampleWeighingSearch: no validation dataloader to search alpha on; skipped.")
            return None
        start = time.perf_counter()
        result = search_example_weighing(
            pl_module,
            loader,
            self.alphas,
            self.forward_fn,
            progress=trainer_shows_progress(trainer),
            below_main_bar=trainer.state.fn == "fit",
        )
        self.alpha, self.table = result.best_alpha, result.table()
        metrics = {f"example_weighing/acc@alpha={a:.6g}": acc for a, acc in zip(result.alphas, result.accuracies)}
        metrics["example_weighing/best_alpha"] = result.best_alpha
        metrics["example_weighing/best_acc"] = result.best_accuracy
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text) and trainer.is_global_zero:
                add_text("example_weighing/table", result.to_markdown(), trainer.global_step)
        plain = f" (alpha 0: {result.accuracies[result.alphas.index(0.0)]:.4f})" if 0.0 in result.alphas else ""
        rank_zero_info(
            f"ExampleWeighingSearch: best alpha {result.best_alpha:.6g}, val acc {result.best_accuracy:.4f}{plain}, "
            f"{len(result.alphas)} alphas in {time.perf_counter() - start:.1f} s"
        )
        return result

    def _apply(self, pl_module: LightningModule) -> None:
        if self.alpha is not None:
            set_example_weighing_alpha(pl_module, self.alpha)


def _checkpoint_dir(trainer: Trainer) -> str:
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None)
    if dirpath:
        return str(dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
