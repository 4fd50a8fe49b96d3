"""Figures for the research tools (optional dependency: matplotlib).

matplotlib is an optional extra: ``pip install normlightning[plots]``. Every function
here imports it lazily through :func:`require_matplotlib`, so importing this module
never fails; calling a plotting function without matplotlib raises an ``ImportError``
that names the extra to install.

Functions
---------
- :func:`plot_statistics_evolution`: batch statistic vs training step, one row per
  layer, mean and std side by side (HN paper, Figure 7).
- :func:`plot_fluctuation`: fluctuation (std over a window of steps) of the BN-view and
  EN-view mean and std, one group of bars per layer (HN paper, Figure 6).
- :func:`read_png`: a written figure as an ``(H, W, 3)`` array, e.g. for TensorBoard's ``add_image``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["require_matplotlib", "plot_statistics_evolution", "plot_fluctuation", "read_png"]

_MISSING_MESSAGE = (
    "Plotting needs matplotlib, which is not installed. Install the optional extra with "
    "`pip install normlightning[plots]` (or `pip install matplotlib`)"
)


def require_matplotlib() -> Any:
    """Return ``matplotlib.pyplot`` set to the non-interactive ``Agg`` backend.

    Raises:
        ImportError: matplotlib is missing; the message names ``pip install normlightning[plots]``.
    """
    try:
        import matplotlib
    except ImportError as err:  # pragma: no branch - message is the point
        raise ImportError(_MISSING_MESSAGE) from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_statistics_evolution(
    steps: Mapping[str, Sequence[int]],
    series: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    path: str | os.PathLike,
    title: str | None = None,
    note: str | None = None,
) -> str:
    """Plot statistics against the training step (HN paper, Figure 7).

    Args:
        steps: ``{layer: [step_0, step_1, ...]}``, the x axis of each layer.
        series: ``{layer: {"mean": {label: values}, "std": {label: values}}}``; each
            ``values`` has the length of ``steps[layer]``. The labels are the legend entries
            (e.g. ``"BN view, channel 0"``, ``"EN view (whole layer)"``).
        path: PNG file to write (parent folders are created).
        title: figure title (say which data, model and training it shows).
        note: a line under the panels (e.g. what the legend's views mean).

    Returns:
        ``str(path)``.
    """
    plt = require_matplotlib()
    layers = list(series)
    if not layers:
        raise ValueError("plot_statistics_evolution: `series` is empty; record at least one layer first")
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 2.6 * len(layers) + 0.9), squeeze=False)
    for row, layer in enumerate(layers):
        x = list(steps[layer])
        for col, stat in enumerate(("mean", "std")):
            ax = axes[row][col]
            for label, values in series[layer].get(stat, {}).items():
                ax.plot(x, list(values), label=label, linewidth=1.0)
            ax.set_title(f"{layer}: batch {stat} of the layer input", fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.set_ylabel(stat, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, loc="best")
    return _finish(fig, plt, path, title, note)


def plot_fluctuation(
    fluctuation: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str | None = None,
    ylabel: str = "fluctuation (std over a window of steps)",
    note: str | None = None,
) -> str:
    """Bar chart of statistic fluctuation per layer (HN paper, Figure 6).

    Args:
        fluctuation: ``{layer: {statistic_name: value}}``; one bar group per layer, one bar
            (and legend entry) per statistic name, e.g. ``"BN view mean"``, ``"EN view std"``.
        path: PNG file to write (parent folders are created).
        title: figure title (say which data, model and training it shows).
        ylabel: y axis label (what the fluctuation is measured over).
        note: a line under the axes (e.g. what the legend's views mean).

    Returns:
        ``str(path)``.
    """
    plt = require_matplotlib()
    layers = list(fluctuation)
    if not layers:
        raise ValueError("plot_fluctuation: `fluctuation` is empty; record at least one layer first")
    names: list[str] = []
    for layer in layers:
        names.extend(n for n in fluctuation[layer] if n not in names)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(layers) + 3), 4.2))
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(layers))]
        ys = [float(fluctuation[layer].get(name, float("nan"))) for layer in layers]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=7)
    ax.set_xlabel("normalization layer (its input)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _finish(fig, plt, path, title, note)


def _finish(fig: Any, plt: Any, path: str | os.PathLike, title: str | None, note: str | None) -> str:
    """Add the title and the note, lay out, save and close."""
    if title:
        fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=7.5, wrap=True)
    bottom = min(0.5 / fig.get_figheight(), 0.2) if note else 0.0  # about half an inch for the note
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_png(path: str | os.PathLike) -> Any:
    """The RGB pixels of a PNG written here, ``(H, W, 3)`` float in ``[0, 1]`` (alpha dropped)."""
    plt = require_matplotlib()
    return plt.imread(os.fspath(path))[..., :3]
