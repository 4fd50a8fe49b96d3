"""Make the independent reference formulas (norm_reference.py) importable under
``--import-mode=importlib``, and the one-process stand-in for two processes that the synchronized-statistics
tests share (``two_process_world``)."""

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


class _TwoProcessWorld:
    """An initialized world of two processes whose other process holds the same data: the all-reduce of the
    sums and the count (``torch.distributed.nn.functional.all_reduce``) returns twice the local values, so every
    set's mean and biased variance stay the local ones and its count doubles. Records the group of each
    all-reduce in ``groups``."""

    def __init__(self, monkeypatch):
        import torch.distributed.nn.functional as dist_nn_functional

        self.groups = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(dist_nn_functional, "all_reduce", self._all_reduce)

    def _all_reduce(self, tensor, op=None, group=None):
        self.groups.append(group)
        return tensor * 2


@pytest.fixture
def two_process_world(monkeypatch):
    """The synchronized paths in one process: :class:`_TwoProcessWorld`."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    return _TwoProcessWorld(monkeypatch)
