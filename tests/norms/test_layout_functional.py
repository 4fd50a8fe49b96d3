"""``normlightning.norms.functional.layout`` (issue 27, its mutation survivors):

- ``laid_out_as``: the upstream gradient handed to a native batch-norm backward with exactly its input's strides
  when they are a dense layout, contiguous otherwise (docs/methods.md, "Upstream gradients in another memory
  layout");
- ``memory_format_of``: the standard memory format a tensor is dense in, ``None`` for any other strides;
- ``NormInput.output``: a result handed back in the input's shape, dtype, memory format and (up to size-1 dims)
  strides (docs/methods.md, "Shared conventions").
"""

from __future__ import annotations

import pytest
import torch

from normlightning.norms.functional.layout import NormInput, laid_out_as, memory_format_of

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


@pytest.mark.parametrize(
    "x, fmt",
    [
        (torch.empty(2, 3, 4, 5), torch.contiguous_format),
        (torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.channels_last),
        (torch.empty(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d), torch.channels_last_3d),
        (torch.empty(2, 3, 4, 10)[..., ::2], None),
        (torch.empty(2, 3, 4, 5, 12)[..., ::2], None),
        (torch.empty(2, 3, 8)[..., ::2], None),
    ],
    ids=["contiguous", "channels_last", "channels_last_3d", "strided-4d", "strided-5d", "strided-3d"],
)
def test_memory_format_of_names_the_dense_format_or_none(x, fmt):
    assert memory_format_of(x) == fmt


def test_output_takes_the_input_strides_on_size_1_dims():
    """An ``(N, C, 1, 1)`` input with channel stride 1 (dense, so contiguous) gets its own strides back, which a
    convolution still reads (as channels_last)."""
    x = torch.randn(2, 1, 1, 3, dtype=F64).permute(0, 3, 1, 2)  # (2, 3, 1, 1), strides (3, 1, 3, 3)
    y = torch.randn(2, 3, 1, 1, dtype=F64)  # strides (3, 1, 1, 1)
    out = NormInput(x).output(y)
    assert out.stride() == x.stride() == (3, 1, 3, 3)
    assert torch.equal(out, y)


def test_output_of_an_input_in_no_standard_format_keeps_the_result_layout():
    """A strided view (no standard memory format): the result comes back with its own strides and values."""
    x = torch.randn(2, 3, 4, 10, dtype=F64)[..., ::2]
    y = torch.randn(2, 3, 4, 5, dtype=F64)
    out = NormInput(x).output(y)
    assert out.stride() == y.stride()
    assert torch.equal(out, y)


def test_output_of_a_low_precision_channels_last_input_is_channels_last_in_its_dtype():
    """A bfloat16 channels_last input computed in float32 into a contiguous result: one conversion back to
    bfloat16 in channels_last."""
    x = torch.randn(2, 3, 4, 5).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    y = torch.randn(2, 3, 4, 5)  # float32, contiguous
    out = NormInput(x).output(y)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, y.to(torch.bfloat16))
