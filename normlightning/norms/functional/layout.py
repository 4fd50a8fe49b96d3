"""How every method sees its input and hands back its output: :class:`NormInput`.

A method computes on ``x (N, C, *spatial)`` in the compute dtype (float32 for float16 /
bfloat16 inputs), usually through the view ``(N, C, S)`` (``S`` the product of the spatial
sizes, 1 for ``(N, C)``), and returns a tensor of ``x``'s shape, dtype and memory format
(docs/methods.md, section "Shared conventions", "Precision").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def spatial_size(x: Tensor) -> int:
    """``S``: the product of the spatial sizes of ``x (N, C, *spatial)`` (1 for ``(N, C)``), from
    the shape alone (no indexing op)."""
    return math.prod(x.shape[2:])


def upcast(x: Tensor) -> Tensor:
    """``x`` in :func:`compute_dtype` (``x`` itself when that is its dtype)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def memory_format_of(x: Tensor) -> torch.memory_format | None:
    """The memory format ``x`` is dense in: ``torch.contiguous_format``, ``torch.channels_last``
    (4-D) or ``torch.channels_last_3d`` (5-D); ``None`` for any other strides. A tensor dense
    in two formats (e.g. ``C = 1``) counts as contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _dense(shape, stride) -> bool:
    """Whether ``stride`` lays out a tensor of ``shape`` densely without overlap (size-1 dims free)."""
    expected = 1
    for step, size in sorted((step, size) for size, step in zip(shape, stride) if size != 1):
        if step != expected:
            return False
        expected *= size
    return True


def laid_out_as(g: Tensor | None, stride: tuple[int, ...]) -> Tensor | None:
    """``g`` with exactly the strides ``stride`` (those of the tensor whose gradient it is): ``g``
    itself when they already match, else one copy (contiguous when ``stride`` is not a dense
    layout, e.g. a strided view).

    Fed to a native batch-norm backward (see :func:`~.native.native_batch_norm`), whose CPU
    kernel misreads an upstream gradient dense in another memory format when a dim has size 1."""
    if g is None or g.stride() == stride:  # (a hook may be handed no gradient)
        return g
    if not _dense(g.shape, stride):
        return g.contiguous()
    return torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device).copy_(g)


class NormInput:
    """An input ``x (N, C, *spatial)`` as a method computes on it, and the way back.

    Attributes:
        x: ``x`` in the compute dtype (:func:`compute_dtype`), its own shape and strides.
        weight, bias: the per-channel affine ``(C,)`` in the compute dtype, or ``None``.
        dtype: the compute dtype.

    ``x3`` is the ``(N, C, S)`` view (a view, no copy, for contiguous, channels_last and
    channels_last_3d inputs). :meth:`output` reshapes a result with ``x``'s number of elements
    to ``x``'s shape and gives it ``x``'s dtype and memory format.
    """

    def __init__(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        self._source = x
        self.x = upcast(x)
        self.dtype = dtype = self.x.dtype
        # (dtype checks in Python: a no-op ``.to`` still costs a dispatch per call)
        self.weight = weight if weight is None or weight.dtype == dtype else weight.to(dtype)
        self.bias = bias if bias is None or bias.dtype == dtype else bias.to(dtype)

    @property
    def x3(self) -> Tensor:
        """``x`` (compute dtype) viewed as ``(N, C, S)``."""
        return self.x.reshape(self.x.shape[0], self.x.shape[1], -1)

    def output(self, y: Tensor) -> Tensor:
        """``y`` in the input's shape, dtype and memory format (one copy at most, only when ``y``
        is not already laid out so; a contiguous result of a channels_last input is the case
        this exists for), with the input's very strides when they differ only on size-1 dims.
        Inputs in no standard memory format keep ``y``'s strides."""
        source = self._source
        if y.shape != source.shape:
            y = y.reshape(source.shape)
        fmt = memory_format_of(source)
        if fmt is None or y.is_contiguous(memory_format=fmt):
            if fmt is not None and y.stride() != source.stride():
                # the same layout up to the strides of size-1 dims, which convolutions still read
                # (a (N, C, 1, 1) tensor with channel stride 1 counts as channels_last there)
                y = y.as_strided(source.shape, source.stride())
            return y if y.dtype == source.dtype else y.to(source.dtype)
        if y.dtype != source.dtype:
            return y.to(dtype=source.dtype, memory_format=fmt)
        return y.contiguous(memory_format=fmt)
