"""Progress bars for the post-training tools that run outside Lightning's loops (recalibration,
the example-weighing search), drawn like Lightning's own TQDM bars: same class (``Tqdm``), same
format (``TQDMProgressBar.BAR_FORMAT``), on stdout.

Inside a run, a tool shows its bar when the run shows Lightning's (rank 0, progress bar
enabled: :func:`trainer_shows_progress`), below the training bar during ``fit`` (and removed
when done, like the validation bar); called as plain functions, the tools take ``progress=True``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

__all__ = ["counted", "loader_length", "progress_bar", "trainer_shows_progress"]


def trainer_shows_progress(trainer: Trainer) -> bool:
    """Whether ``trainer`` draws progress bars in this process (rank 0 with an enabled progress bar)."""
    bar = trainer.progress_bar_callback
    return bool(trainer.is_global_zero and bar is not None and bar.is_enabled)


def progress_bar(desc: str, total: int | None, enabled: bool, *, below_main_bar: bool = False) -> Tqdm:
    """A Lightning-style bar of ``total`` steps (``None``: unknown); a disabled one draws nothing.

    ``below_main_bar``: draw it on the line below Lightning's training bar and remove it when
    closed (as Lightning's validation bar during ``fit``); otherwise it stays on screen.
    """
    return Tqdm(
        desc=desc,
        total=total,
        disable=not enabled,
        position=1 if below_main_bar else 0,
        leave=not below_main_bar,
        dynamic_ncols=True,
        file=sys.stdout,
        smoothing=0,
        bar_format=TQDMProgressBar.BAR_FORMAT,
    )


def loader_length(batches: Iterable[Any]) -> int | None:
    """``len(batches)`` when it has one (a DataLoader over a sized dataset), else ``None``."""
    try:
        return len(batches)
    except TypeError:
        return None


def counted(batches: Iterable[Any], bar: Tqdm) -> Iterator[Any]:
    """Yield ``batches``, advancing ``bar`` by one after each."""
    for batch in batches:
        yield batch
        bar.update(1)
