"""Folding inference-mode normalization layers into the convolution before them.

At inference a layer whose statistics are constants per channel is ``y = s_c x + t_c`` with
``s_c = gamma_c / sqrt(var_c + eps)`` and ``t_c = beta_c - mean_c s_c``. When its input is the
output of a convolution, nothing else reads that output and nothing else uses the convolution's
weight and bias, the convolution can compute ``y`` itself: ``W'[o] = s_o W[o]``,
``b'[o] = s_o b[o] + t_o``; the norm layer becomes ``nn.Identity``. What proves those conditions:
:mod:`normlightning.injection.fold_proof`.
That holds for native ``BatchNorm*d`` and for the layers with ``inference_channel_statistics()``
(bn, brn, ghost, gbgn without example weighing; bgn with whole-channel groups; hn with batch sets
only, as the HN paper notes). Model surgery, like the injection: plain PyTorch, in place.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from normlightning.injection.apply import _replace_submodule
from normlightning.injection.fold_proof import CONVOLUTIONS, example_forward, exclusivity_problems
from normlightning.injection.spec import MODULE_ATTR
from normlightning.norms.model_walk import is_norm_layer

__all__ = ["fold_norms", "inference_affine"]

#: native batch norms whose forward is only the normalization (a subclass may add to it, e.g.
#: timm's ``BatchNormAct2d`` applies an activation: inject our layers first, they carry it).
NATIVE_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _plain_convolution(module: nn.Module) -> bool:
    """A ``Conv1d/2d/3d`` itself, or one whose weight is a parametrization (folded by baking it
    in); a subclass may rewrite its weight in ``forward`` (``WSConv2d`` standardizes it)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls in CONVOLUTIONS


def inference_affine(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """``(s, t)`` per channel, float64, with ``layer(x) = s_c x + t_c`` at inference.

    Raises ``ValueError`` (the reason) when ``layer``'s inference statistics are not constants per
    channel: per-example sets (gn, ln, in, pn, sn, seqnorm, hn with per-example sets), example
    weighing, bgn groups that split channels, a BatchNorm without running statistics.
    """
    if isinstance(layer, _BatchNorm):
        if type(layer) not in NATIVE_BATCH_NORMS:
            raise ValueError(
                f"{type(layer).__name__} subclasses {type(layer).__mro__[1].__name__} and may do more than normalize "
                "(timm's BatchNormAct2d applies an activation); inject our layers first (norm: bn carries it over)"
            )
        if layer.running_mean is None or not layer.track_running_stats:
            raise ValueError(
                f"{type(layer).__name__} keeps no running statistics (track_running_stats=False, or running_mean set "
                "to None)"
            )
        mean, var = layer.running_mean, layer.running_var
    elif hasattr(layer, "inference_channel_statistics"):
        mean, var = layer.inference_channel_statistics()
    else:
        raise ValueError(
            f"{type(layer).__name__} computes its statistics from each input at inference (per-example sets)"
        )
    scale = torch.rsqrt(var.detach().double() + layer.eps)
    if getattr(layer, "weight", None) is not None:
        scale = scale * layer.weight.detach().double()
    shift = -mean.detach().double() * scale
    if getattr(layer, "bias", None) is not None:
        shift = shift + layer.bias.detach().double()
    return scale, shift


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _as_traced_leaves(value: Any) -> Any:
    """``value`` with every tensor replaced by a detached copy that requires a gradient (floating
    point), so the example forward builds an autograd graph even with frozen parameters."""
    if isinstance(value, Tensor):
        return value.detach().clone().requires_grad_(value.is_floating_point())
    if isinstance(value, dict):
        return type(value)((k, _as_traced_leaves(v)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_as_traced_leaves(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_as_traced_leaves(v) for v in value)
    return value


def _readers(outputs: Any, intermediates: Iterable[Tensor] = ()) -> Counter:
    """How many times each autograd output ``(node, index)`` is read: by a later node of the graph
    that produced ``outputs`` and ``intermediates`` (tensors computed on the way, whose reads count
    even where ``outputs`` do not depend on them), or as one of ``outputs``."""
    counts: Counter = Counter()
    stack, seen = [t.grad_fn for t in intermediates if t.grad_fn is not None], set()
    for t in _tensors(outputs):
        if t.grad_fn is not None:
            counts[(t.grad_fn, t.output_nr)] += 1
            stack.append(t.grad_fn)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, index in node.next_functions:
            if child is not None:
                counts[(child, index)] += 1
                stack.append(child)
    return counts


def _trace(model: nn.Module, example_input: Any, norms: dict[str, nn.Module]) -> tuple[dict[str, str], dict[str, str]]:
    """One forward of ``example_input`` (eval mode): ``({norm: convolution}, {norm: why not})``. A
    norm layer qualifies when it reads exactly the output of one convolution (called once), and
    nothing else reads that output, not even in place (the tensor the norm receives is still the
    convolution's output: same autograd node, same version). The norm layer's own read is counted
    from its output's autograd graph, also where the model's outputs do not depend on it."""
    convs = {m: name for name, m in model.named_modules() if isinstance(m, CONVOLUTIONS)}
    produced: dict[int, tuple[str, Tensor, Any, int]] = {}
    inputs: dict[str, list[Tensor]] = {name: [] for name in norms}
    results: dict[str, list[Tensor]] = {name: [] for name in norms}
    calls: Counter = Counter()

    def conv_hook(module, args, output):
        calls[convs[module]] += 1
        produced[id(output)] = (convs[module], output, output.grad_fn, output._version)

    def norm_pre_hook(name):
        return lambda module, args: inputs[name].append(args[0])

    def norm_hook(name):
        return lambda module, args, output: results[name].extend(_tensors(output))

    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_pre_hook(norm_pre_hook(name)) for name, m in norms.items()]
    handles += [m.register_forward_hook(norm_hook(name)) for name, m in norms.items()]
    try:
        outputs = example_forward(model, _as_traced_leaves(example_input), grad=True)
    finally:
        for handle in handles:
            handle.remove()
    readers = _readers(outputs, [t for ts in results.values() for t in ts])
    found, problems = {}, {}
    for name, seen in inputs.items():
        if len(seen) != 1:
            problems[name] = f"the example forward called it {len(seen)} times (folding needs exactly one call)"
            continue
        t = seen[0]
        conv = produced.get(id(t))
        if conv is None or conv[1] is not t:
            problems[name] = "it is not directly after a convolution (its input is not a Conv1d/2d/3d output)"
        elif conv[2] is not t.grad_fn or conv[3] != t._version:
            problems[name] = (
                f"the output of the convolution {conv[0]!r} before it is changed in place before the norm "
                "layer reads it"
            )
        elif t.grad_fn is None or all(out.grad_fn is None for out in results[name]):
            problems[name] = "the example forward built no autograd graph to check what reads the convolution's output"
        elif not _plain_convolution(model.get_submodule(conv[0])):
            kind = type(model.get_submodule(conv[0])).__name__
            problems[name] = (
                f"the convolution {conv[0]!r} before it is a {kind}, whose forward may change its weight "
                "(folding needs a plain Conv1d/2d/3d)"
            )
        elif calls[conv[0]] != 1:
            problems[name] = f"the convolution {conv[0]!r} before it runs {calls[conv[0]]} times"
        elif readers[(t.grad_fn, t.output_nr)] != 1:
            problems[name] = f"the output of the convolution {conv[0]!r} before it is also read elsewhere"
        else:
            found[name] = conv[0]
    return found, problems


def _fold_into(conv: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``W'[o] = s_o W[o]``, ``b'[o] = s_o b[o] + t_o`` in place; parametrizations of the weight
    (weight standardization, weight norm) or the bias are baked in first: writing into a
    parametrized tensor would write into a value computed on each access, and be lost."""
    if parametrize.is_parametrized(conv):
        for name in list(conv.parametrizations):
            parametrize.remove_parametrizations(conv, name, leave_parametrized=True)
    with torch.no_grad():
        weight = conv.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.copy_((weight.double() * scale.view(shape)).to(weight.dtype))
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(weight.dtype))
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_norms(
    model: nn.Module,
    example_input: Any = None,
    *,
    exclude: Iterable[str] = (),
    skip_unfoldable: bool = False,
    assume_exclusive: bool = False,
) -> dict[str, str]:
    """Fold every inference-mode normalization layer of ``model`` into the convolution before it.

    Args:
        model: the model, in eval mode (its norm layers at least): folding uses the running
            statistics.
        example_input: one input of ``model`` for an eval forward that finds, for each norm
            layer, the convolution that produces its input (default: ``model.example_input_array``,
            which the tasks have). Nothing is updated by it.
        exclude: regexes (``re.fullmatch`` on module names) of norm layers to leave as they are.
        skip_unfoldable: leave the layers that cannot be folded (with a warning) instead of
            raising ``ValueError``.
        assume_exclusive: your promise, for a model that ``torch.fx`` cannot trace, that on every
            input the output of each convolution before a norm layer is read by that layer alone
            and the convolution's weight and bias by nothing else. Then the module tree and the
            ops of the example forward are still checked (the input's path only: a reader on a
            branch it does not take is not seen); the promise never overrides a reader they show.

    Returns:
        ``{norm layer name: convolution name}`` of the folded layers (each now ``nn.Identity``).

    Raises:
        ValueError: naming every norm layer that cannot be folded and why (training mode,
            statistics not constant per channel, not directly after a convolution, the
            convolution's output or parameters also read elsewhere, a model that ``torch.fx``
            cannot trace without ``assume_exclusive``), before anything is changed.

    What is checked before folding (:mod:`normlightning.injection.fold_proof`): the example forward
    finds the convolution whose output each norm layer receives; the module tree shows no other
    parameter or buffer sharing the convolution's storage and no hook that would read or drop
    anything; a ``torch.fx`` trace of ``model.forward`` (one graph for every input) shows the
    output read by the norm layer alone and the parameters by the convolution alone; and no op of
    the example forward reads them elsewhere.

    The model's injection spec is dropped (its layers are gone): save a folded model's
    ``state_dict`` for inference, not as a checkpoint to resume or re-inject.
    """
    patterns = [re.compile(p) for p in exclude]
    norms = {
        name: m
        for name, m in model.named_modules()
        if name and is_norm_layer(m) and not any(p.fullmatch(name) for p in patterns)
    }
    problems: dict[str, str] = {}
    affines: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in norms.items():
        if layer.training:
            problems[name] = (
                f"{type(layer).__name__} is in training mode (call model.eval(): folding uses the running statistics)"
            )
            continue
        try:
            affines[name] = inference_affine(layer)
        except ValueError as err:
            problems[name] = str(err)
    convs: dict[str, str] = {}
    if affines:
        if example_input is None:
            example_input = getattr(model, "example_input_array", None)
        if example_input is None:
            raise ValueError(
                "fold_norms needs example_input (one input of the model) to find the convolution before each norm layer"
            )
        convs, not_after_conv = _trace(model, example_input, {n: norms[n] for n in affines})
        problems.update(not_after_conv)
        problems.update(exclusivity_problems(model, example_input, convs, assume_exclusive=assume_exclusive))
        convs = {name: conv for name, conv in convs.items() if name not in problems}
    for name, conv_name in list(convs.items()):
        if model.get_submodule(conv_name).out_channels != affines[name][0].numel():
            problems[name] = f"the convolution {conv_name!r} before it has a different number of channels"
            del convs[name]
    if problems:
        listed = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        if not skip_unfoldable:
            raise ValueError(f"fold_norms cannot fold {len(problems)} norm layer(s) (nothing was changed):\n{listed}")
        warnings.warn(f"fold_norms left {len(problems)} norm layer(s) as they are:\n{listed}", stacklevel=2)
    for name, conv_name in convs.items():
        _fold_into(model.get_submodule(conv_name), *affines[name])
        _replace_submodule(model, name, nn.Identity())
    if convs:
        for module in model.modules():
            module.__dict__.pop(MODULE_ATTR, None)
    return convs
