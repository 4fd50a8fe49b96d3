"""conftest's restored global state: what one test registers, seeds or filters is gone for the next (issue 27)."""

from __future__ import annotations

import random
import signal
import warnings

import numpy as np
import torch
from torch import nn

from normlightning.models import available_backbones, register_backbone
from normlightning.norms import available_norms, register_norm


def test_registries_filters_and_generators_are_restored(global_state_restorer) -> None:
    norms, backbones, filters = available_norms(), available_backbones(), list(warnings.filters)
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with global_state_restorer():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # what Lightning leaves after a Ctrl+C
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        register_norm("leaked_norm", lambda num_features: nn.Identity())
        register_backbone("leaked_backbone", lambda num_classes, input_shape: nn.Identity())
        warnings.simplefilter("ignore")
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        assert "leaked_norm" in available_norms() and "leaked_backbone" in available_backbones()
    assert available_norms() == norms and available_backbones() == backbones
    assert list(warnings.filters) == filters
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_rng, strict=True))
    assert random.getstate() == python_rng
    assert signal.getsignal(signal.SIGINT) == sigint and signal.getsignal(signal.SIGTERM) == sigterm
