"""The random-number states that a resumed run must continue from.

Saved in every checkpoint of a task (under :data:`CHECKPOINT_KEY`) and set again when training
resumes, so dropout, augmentations, loader seeds and PGD's random starts continue exactly where
the interrupted run stopped (together with the epoch-seeded data order of
:class:`~normlightning.data.samplers.EpochSeededRandomSampler`, resume at an epoch boundary is
bit-exact on CPU).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_KEY", "capture_rng_states", "restore_rng_states"]

CHECKPOINT_KEY = "rng_states"


def capture_rng_states() -> dict[str, Any]:
    """The states of torch's CPU (and CUDA) generators, numpy's and Python's global generators,
    as tensors and plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(algorithm),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators to ``states`` (from :func:`capture_rng_states`)."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
