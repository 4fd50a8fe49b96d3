"""Accuracy vs per-process batch size for many normalization methods (BGN paper, Figure 1).

A thin wrapper around :mod:`normlightning.sweep` with the grid of ``docs/reproduction.md``
as defaults: the small CNN on scikit-learn's 8x8 digits
(``examples/configs/sweep_digits.yaml``), methods bn gn ln in pn ghost seqnorm bgn gbgn hn,
per-process batch sizes 2, 8, 64, seeds 0 1 2, SGD with lr 0.1 at batch 64 scaled linearly
with the batch, cosine schedule. Epochs grow with the batch (2, 4 and 16 epochs at batch 2, 8
and 64: about 1,080, 540 and 270 optimizer steps) so that the large batches, which take few
steps per epoch, also settle within the CPU budget. Any ``normlightning.sweep`` option given on the
command line replaces the default::

    python examples/batch_size_sweep.py                         # the report grid (resumable)
    python examples/batch_size_sweep.py --methods bn gn --seeds 0 --out runs/my_sweep

Writes ``<out>/results.csv``, ``<out>/table.md`` and ``<out>/accuracy_vs_batch.png``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from normlightning import sweep

CONFIG = str(Path(__file__).resolve().parent / "configs" / "sweep_digits.yaml")
REPORT_METHODS = ["bn", "gn", "ln", "in", "pn", "ghost", "seqnorm", "bgn", "gbgn", "hn"]
REPORT_DEFAULTS = [
    "--config",
    CONFIG,
    "--out",
    "runs/reproduction/sweep",
    "--methods",
    *REPORT_METHODS,
    "--batch-sizes",
    "2",
    "8",
    "64",
    "--seeds",
    "0",
    "1",
    "2",
    "--epochs",
    "2=2",
    "8=4",
    "64=16",
    "--base-batch-size",
    "64",
    "--executor",
    "inline",
]


def main(argv: Sequence[str] | None = None) -> sweep.SweepResult | None:
    """Run :func:`normlightning.sweep.main` with the report defaults, then ``argv`` on top."""
    return sweep.main([*REPORT_DEFAULTS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
