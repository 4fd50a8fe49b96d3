"""What proves that folding a norm layer into the convolution before it keeps the model's function.

Folding rewrites the convolution's weight and bias (``W'[o] = s_o W[o]``, ``b'[o] = s_o b[o] + t_o``)
and drops the norm layer, so it keeps the function only when the convolution's output is read by
that norm layer alone and its parameters by nothing but the convolution. Three checks, in order:

- the module tree: no other parameter or buffer of the model shares storage with the
  convolution's parameters (``conv2.weight = conv.weight``), no forward hook reads the
  convolution's output, no hook on the norm layer would be dropped;
- a ``torch.fx`` symbolic trace of ``model.forward``, one graph for every input (tracing refuses
  control flow on tensor values and shapes): the convolution and the norm layer are each called
  once, the norm layer's only input is the convolution's output, that output has no other user (a
  comparison, ``.detach()``, an op under ``torch.no_grad()``, the model's outputs, an attribute
  that keeps it: ``self.features = h``) and no other node reads the convolution's parameters
  (``F.conv2d(x, conv.weight)``, a tensor constant sharing their storage). Convolutions, norm
  layers, ``torch.nn`` layers and modules that contain no convolution or norm layer are single
  calls in the graph;
- every ATen op of one example forward: none reads the convolution's parameters outside the
  convolution, or its output outside the norm layer (storage aliasing, so views and ``.detach()``
  count). This sees what the graph cannot: a tensor reached through a Python list, a global or a
  closure, the inside of a module the graph calls as one node. As the trace shows one path for
  every input, the example's path is that path (except for branches inside those modules).

A model that ``torch.fx`` cannot trace folds only on the user's promise (``assume_exclusive``):
then the module tree and the example's path are checked, and other paths are the promise.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from normlightning.norms.model_walk import is_norm_layer

__all__ = ["exclusivity_problems"]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _storages(tensors: Iterable[Tensor]) -> set[int]:
    """Addresses of the storages behind ``tensors`` (empty ones and meta tensors have none)."""
    return {t.untyped_storage().data_ptr() for t in tensors if t.untyped_storage().nbytes() > 0}


def _aliases(tensor: object, storages: set[int]) -> bool:
    return isinstance(tensor, Tensor) and bool(_storages([tensor]) & storages)


def _module_tree_problems(model: nn.Module, pairs: dict[str, str]) -> dict[str, str]:
    """Shared parameter storage and hooks, per norm layer of ``pairs`` (``{norm: convolution}``)."""
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    problems = {}
    for norm, conv in pairs.items():
        module = model.get_submodule(conv)
        own = {name: _storages([t]) for name, t in module.named_parameters(remove_duplicate=False)}
        shared = [
            f"{repr(f'{conv}.{local}')} is also {name!r}"
            for name, t in tensors
            if not name.startswith(f"{conv}.")
            for local, storage in own.items()
            if _aliases(t, storage)
        ]
        if shared:
            problems[norm] = (
                f"a parameter of the convolution {conv!r} before it is shared ({', '.join(shared)}): folding would "
                "change that reader too"
            )
        elif module._forward_hooks:
            problems[norm] = (
                f"the convolution {conv!r} before it has forward hooks, which read its output (remove them)"
            )
        elif model.get_submodule(norm)._forward_hooks or model.get_submodule(norm)._forward_pre_hooks:
            problems[norm] = "it has forward hooks, which folding would drop (remove them)"
    return problems


def example_forward(model: nn.Module, example_input: Any, *, grad: bool) -> Any:
    """``model(example_input)`` outside inference mode, gradients on or off; every buffer restored
    afterwards (layers left in training mode update theirs)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            return model(example_input)
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


class _StorageReads(TorchDispatchMode):
    """Records each ATen op that reads a watched storage while the module allowed to read it is not
    running: ``watched[storage] = (norm layer, what, allowed module)``, ``reads[(norm layer, what)]``
    the op names."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[str, str, str]] = {}
        self.running: Counter = Counter()
        self.reads: dict[tuple[str, str], list[str]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and (entry := self.watched.get(next(iter(_storages([t])), None))):
                norm, what, allowed = entry
                if not self.running[allowed]:
                    self.reads[(norm, what)].append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _example_reader_problems(model: nn.Module, example_input: Any, pairs: dict[str, str]) -> dict[str, str]:
    """Every ATen op of one example forward (no gradients) that reads a convolution's parameters
    outside that convolution, or its output outside the norm layer of ``pairs`` after it: readers
    that the graph may not show (a tensor reached through a Python list, a global, a closure, or
    inside a module the graph calls as one node), on the example's path."""
    if not pairs:
        return {}
    mode, handles, outputs = _StorageReads(), [], []

    def enter(name):
        return lambda module, args: mode.running.update([name])

    def leave(name, norm=None):
        def hook(module, args, output):
            mode.running.subtract([name])
            if norm is not None:  # the convolution's output: watched from now on
                outputs.append(output)
                mode.watched.update({s: (norm, "output", norm) for s in _storages([output])})

        return hook

    for norm, conv in pairs.items():
        module = model.get_submodule(conv)
        mode.watched.update({s: (norm, "parameter", conv) for s in _storages(module.parameters())})
        for name, after in ((conv, norm), (norm, None)):
            handles.append(model.get_submodule(name).register_forward_pre_hook(enter(name)))
            handles.append(model.get_submodule(name).register_forward_hook(leave(name, after)))
    try:
        with mode:
            example_forward(model, example_input, grad=False)
    finally:
        for handle in handles:
            handle.remove()
    problems = {}
    for (norm, what), ops in mode.reads.items():
        problems.setdefault(
            norm,
            (
                f"{'the output' if what == 'output' else 'a parameter'} of the convolution {pairs[norm]!r} "
                "before it is "
                f"also read elsewhere (by {', '.join(dict.fromkeys(ops))} in the example forward)"
            ),
        )
    return problems


class _Tracer(fx.Tracer):
    """Convolutions, norm layers and modules without either stay single ``call_module`` nodes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.opaque = {
            m
            for m in model.modules()
            if isinstance(m, CONVOLUTIONS)
            or is_norm_layer(m)
            or not any(isinstance(s, CONVOLUTIONS) or is_norm_layer(s) for s in m.modules())
        }

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self.opaque or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Traced:
    """``model.forward``'s graph, the value of each ``get_attr`` node, and the module attributes
    (``"block.cache"``) in which the forward stores each node's value."""

    graph: fx.Graph
    values: dict[fx.Node, object]
    stored: dict[fx.Node, list[str]]


def _trace(model: nn.Module) -> _Traced:
    """Traces ``model.forward``; every module's attributes are put back as they were (tracing stores
    tensor constants on ``model``, and a forward that keeps a value on a module keeps a proxy)."""
    saved = [(name, m, dict(vars(m))) for name, m in model.named_modules()]
    tracer = _Tracer(model)
    stored: dict[fx.Node, list[str]] = defaultdict(list)
    try:
        graph = tracer.trace(model)
    finally:
        constants = {name: value for value, name in getattr(tracer, "tensor_attrs", {}).items()}
        for name, module, attributes in saved:
            for key, value in vars(module).items():
                for leaf in pytree.tree_leaves(value):
                    if isinstance(leaf, fx.Proxy):
                        stored[leaf.node].append(f"{name}.{key}" if name else key)
            module.__dict__.clear()
            module.__dict__.update(attributes)
    values = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            values[node] = constants[node.target] if node.target in constants else _attribute(model, node.target)
    return _Traced(graph, values, stored)


def _attribute(model: nn.Module, target: str) -> object:
    *path, name = target.split(".")
    return getattr(model.get_submodule(".".join(path)), name)


def _describe(node: fx.Node) -> str:
    """How a graph node reads its arguments, in words: ``gt``, ``.detach()``, ``module 'conv2'``."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return {operator.getitem.__name__: "indexing"}.get(name, name)
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "get_attr":
        return f"attribute {node.target!r}"
    return "the model's output"


def _graph_problems(traced: _Traced, model: nn.Module, pairs: dict[str, str]) -> dict[str, str]:
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    problems = {}
    for norm, conv in pairs.items():
        if len(calls[conv]) != 1 or len(calls[norm]) != 1:
            problems[norm] = (
                f"the traced graph calls it {len(calls[norm])} times and the convolution {conv!r} before it "
                f"{len(calls[conv])} times (folding needs exactly one call of each)"
            )
            continue
        (conv_node,), (norm_node,) = calls[conv], calls[norm]
        storages = _storages(model.get_submodule(conv).parameters())
        output_readers = [_describe(n) for n in conv_node.users if n is not norm_node]
        output_readers += [f"the attribute {path!r} that keeps it" for path in traced.stored.get(conv_node, [])]
        parameter_readers = [
            _describe(n)
            for n in traced.graph.nodes
            if (n.op == "get_attr" and _aliases(traced.values[n], storages))
            or (n.op == "call_module" and n.target.startswith(f"{conv}."))
        ]
        if norm_node.args != (conv_node,) or norm_node.kwargs:
            problems[norm] = f"the traced graph does not show it reading only the output of the convolution {conv!r}"
        elif output_readers:
            problems[norm] = (
                f"the output of the convolution {conv!r} before it is also read elsewhere (by "
                f"{', '.join(output_readers)} in the traced graph)"
            )
        elif parameter_readers:
            problems[norm] = (
                f"a parameter of the convolution {conv!r} before it is also read elsewhere (by "
                f"{', '.join(parameter_readers)} in the traced graph)"
            )
    return problems


def exclusivity_problems(
    model: nn.Module, example_input: Any, pairs: dict[str, str], *, assume_exclusive: bool
) -> dict[str, str]:
    """``{norm layer: why folding it could change the model's function}`` for ``pairs``
    (``{norm layer name: name of the convolution whose output it reads}``, from an example forward).

    In order, the first reason per layer: the module tree; the ``torch.fx`` graph (a model that
    does not trace gets a reason for every layer, unless ``assume_exclusive``: the user's promise
    that nothing but the norm layer reads each convolution's output, and nothing but the
    convolution its parameters, on every input); the ops of one example forward.
    """
    problems = _module_tree_problems(model, pairs)
    pending = {norm: conv for norm, conv in pairs.items() if norm not in problems}
    if not pending:
        return problems
    try:
        traced = _trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure leaves the structure unproven
        if not assume_exclusive:
            cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return problems | {
                norm: f"torch.fx cannot trace the model ({cause}), so nothing proves that only it reads the output of "
                f"the convolution {conv!r}; pass assume_exclusive=True if you know that it does"
                for norm, conv in pending.items()
            }
    else:
        problems.update(_graph_problems(traced, model, pending))
    pending = {norm: conv for norm, conv in pending.items() if norm not in problems}
    return problems | _example_reader_problems(model, example_input, pending)
