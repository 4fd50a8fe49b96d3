"""The one place where normlightning silences messages it knows to be harmless.

Every run of the ``normlightning`` command (and every sweep cell and study run, which build the
same CLI) calls :func:`install` before anything is parsed. Each entry of :data:`KNOWN_WARNINGS`
and :data:`KNOWN_LOG_MESSAGES` says what the message is, where it comes from and why it is
harmless. Messages whose cause is ours are fixed at the cause instead, not listed here:

- ``pin_memory`` on a CPU-only run: our DataModules pin host memory only when the run's device
  is a GPU (:meth:`normlightning.data.base.BaseDataModule.loader_pin_memory`);
- "The dirpath has changed" on ``validate``/``test``/``predict --ckpt_path``: our checkpoint
  callback restores only ``best_model_path`` outside ``fit`` (:mod:`normlightning.callbacks.checkpoint`);
- LightningCLI's "args + sys.argv" warning: :func:`normlightning.cli.build_cli` takes explicit
  arguments in place of ``sys.argv`` by design (a sweep cell is built inside the sweep's own
  process), so the CLI does not compare the two;
- CSVLogger's "directory exists and is not empty" in sweep cells: each attempt of a cell logs
  into a fresh ``logs/`` folder (:mod:`normlightning.sweep.grid`, :mod:`normlightning.sweep.cell`).

Call :func:`install` yourself when you drive Lightning from Python without the CLI. It is
idempotent; it only adds filters, it never turns on a warning that was off.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["KNOWN_LOG_MESSAGES", "KNOWN_WARNINGS", "KnownMessage", "install"]


@dataclass(frozen=True)
class KnownMessage:
    """A message filtered by :func:`install`.

    Attributes:
        pattern: regular expression matched (``re.match``) against the start of the message.
        source: where it is raised.
        why_harmless: why hiding it loses nothing.
        category: warning class (warnings only).
        module: regular expression of the module the warning is attributed to (``""``: any).
    """

    pattern: str
    source: str
    why_harmless: str
    category: type[Warning] = UserWarning
    module: str = ""


#: Python warnings filtered by :func:`install`.
KNOWN_WARNINGS: tuple[KnownMessage, ...] = (
    KnownMessage(
        pattern=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        source="lightning/pytorch/utilities/_pytree.py (Lightning 2.6 with torch >= 2.10): Lightning's own "
        "copy of tree_flatten builds a LeafSpec, which torch deprecated",
        why_harmless="a deprecation inside Lightning, not in normlightning or user code; the result is unchanged",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    ),
    KnownMessage(
        pattern=r"Your `IterableDataset` has `__len__` defined",
        source="lightning/pytorch/utilities/data.py (has_len_all_ranks), for every loader over an IterableDataset "
        "that has __len__; ours is the few-shot EpisodeDataset",
        why_harmless="EpisodeDataset deals its episodes to the loader workers (worker w of W yields every W-th "
        "episode of this process's share), so its __len__ is the exact number of batches; Lightning warns "
        "for any IterableDataset with a __len__ because it cannot know that",
    ),
)

#: Log records (Lightning's ``rank_zero_info``) filtered by :func:`install`: logger name -> messages.
KNOWN_LOG_MESSAGES: dict[str, tuple[KnownMessage, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        KnownMessage(
            pattern=r"💡 Tip: For seamless cloud logging",
            source="lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py: printed by every "
            "Trainer that has no LitLogger",
            why_harmless="an advertisement for a hosted logging service, not about the run",
        ),
    ),
}


class _DropKnownMessages(logging.Filter):
    """Drops log records whose message starts with one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_LOG_FILTERS = {
    name: _DropKnownMessages(tuple(m.pattern for m in messages)) for name, messages in KNOWN_LOG_MESSAGES.items()
}


def install() -> None:
    """Add the filters of :data:`KNOWN_WARNINGS` and :data:`KNOWN_LOG_MESSAGES` (idempotent)."""
    for known in KNOWN_WARNINGS:
        # filterwarnings removes an identical filter before inserting it: calling twice adds nothing
        warnings.filterwarnings("ignore", message=known.pattern, category=known.category, module=known.module)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # addFilter ignores a filter already present
