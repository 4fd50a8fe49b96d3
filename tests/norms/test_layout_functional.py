"""``laid_out_as`` (``normlightning.norms.functional.layout``): the upstream gradient handed to a native batch-norm
backward with exactly its input's strides when they are a dense layout, contiguous otherwise (docs/methods.md,
"Upstream gradients in another memory layout"; issue 27, its mutation survivors)."""

from __future__ import annotations

import pytest
import torch

from normlightning.norms.functional.layout import laid_out_as

F64 = torch.float64


def _column_major(shape) -> torch.Tensor:
    """Distinct values ``0, 1, ...`` in ``shape``, laid out column-major (not contiguous, not the strides asked for)."""
    return torch.arange(float(torch.Size(shape).numel()), dtype=F64).view(shape).t().contiguous().t()


@pytest.mark.parametrize(
    "shape, stride",
    [((2, 3), (1, 2)), ((1, 3), (5, 1)), ((3, 1), (1, 7))],
    ids=["transposed", "size-1-first-dim", "size-1-last-dim"],
)
def test_a_dense_layout_is_reproduced_stride_for_stride(shape, stride):
    """A dense layout (size-1 dims may have any stride) is reproduced exactly, values unchanged: the native
    backward reads the gradient with the input's very strides."""
    g = torch.arange(float(torch.Size(shape).numel()), dtype=F64).view(shape)  # contiguous: not yet ``stride``
    out = laid_out_as(g, stride)
    assert out.stride() == stride
    assert torch.equal(out, g)


@pytest.mark.parametrize(
    "shape, stride", [((2, 3), (100, 1)), ((2, 3), (0, 1)), ((2, 2), (1, 1))], ids=["gap", "expanded", "overlap"]
)
def test_a_non_dense_layout_comes_back_contiguous(shape, stride):
    """Strides with gaps or overlap (a strided view, an expanded input) are no layout to copy into: the gradient
    comes back contiguous, its values unchanged."""
    g = _column_major(shape)
    out = laid_out_as(g, stride)
    assert out.is_contiguous()
    assert torch.equal(out, g)


def test_the_copy_is_made_on_the_gradient_device():
    """The strided copy is allocated on the gradient's device (the meta device standing in for an accelerator)."""
    out = laid_out_as(torch.empty(2, 3, device="meta"), (1, 2))
    assert (out.device.type, out.stride()) == ("meta", (1, 2))
