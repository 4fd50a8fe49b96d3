"""How every method sees its input: the dtype statistics are computed in and the ``(N, C, S)``
view of ``x (N, C, *spatial)`` (``S`` the product of the spatial sizes, 1 for ``(N, C)``).

float16 / bfloat16 inputs are computed in float32 and the output is cast back to the input's
dtype (docs/methods.md, section "Conventions").
"""

from __future__ import annotations

import torch
from torch import Tensor


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def param(p: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if p is None else p.to(dtype)


def as3d(x: Tensor) -> Tensor:
    """View ``(N, C, *spatial)`` as ``(N, C, S)``."""
    return x.reshape(x.shape[0], x.shape[1], -1)
