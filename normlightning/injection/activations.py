"""The activation module that follows a norm layer, found in one traced forward.

A method whose layer applies its own activation (``frn``'s TLU, which in the paper replaces the
ReLU after the normalization) can take the place of that activation: with
``norm.remove_following_activation: true`` the injection finds, for each such layer, the
activation module (a class of ``torch.nn.modules.activation``: ``ReLU``, ``SiLU``, ...) that reads
the norm layer's output, and replaces it by ``nn.Identity``. It must be unambiguous: the module runs
once in the forward, its input is the norm layer's output unchanged, and nothing else reads that
output; otherwise the layer is refused, naming the reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import activation as activation_modules

from normlightning.injection.fold import _as_traced_leaves, _readers
from normlightning.injection.fold_proof import example_forward

__all__ = ["find_following_activations", "is_activation"]


def is_activation(module: nn.Module) -> bool:
    """A module whose class is defined in ``torch.nn.modules.activation`` (``ReLU``, ``SiLU``, ...)."""
    return type(module).__module__ == activation_modules.__name__


def find_following_activations(
    model: nn.Module, example_input: Any, norm_names: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """``({norm: activation module}, {norm: why none})`` from one forward of ``example_input``
    (gradients on, buffers restored)."""
    activations = {m: name for name, m in model.named_modules() if name and is_activation(m)}
    outputs: dict[str, list[tuple[Tensor, Any, int]]] = {name: [] for name in norm_names}
    inputs: dict[str, list[tuple[str, int]]] = {name: [] for name in norm_names}  # (activation, version read)
    calls: Counter = Counter()

    def norm_hook(name):
        def hook(module, args, output):
            outputs[name].append((output, output.grad_fn, output._version))

        return hook

    def activation_hook(module, args):
        calls[activations[module]] += 1
        if args and isinstance(args[0], Tensor):
            for name, seen in outputs.items():
                if seen and seen[-1][0] is args[0]:
                    inputs[name].append((activations[module], args[0]._version))

    handles = [model.get_submodule(name).register_forward_hook(norm_hook(name)) for name in norm_names]
    handles += [m.register_forward_pre_hook(activation_hook) for m in activations]
    try:
        result = example_forward(model, _as_traced_leaves(example_input), grad=True)
    finally:
        for handle in handles:
            handle.remove()
    readers = _readers(result)
    found, problems = {}, {}
    for name in norm_names:
        if len(outputs[name]) != 1:
            problems[name] = f"the example forward called it {len(outputs[name])} times"
            continue
        _, node, version = outputs[name][0]
        if len(inputs[name]) != 1:
            problems[name] = "no activation module (torch.nn ReLU, SiLU, ...) reads its output directly"
            continue
        act, seen_version = inputs[name][0]
        if seen_version != version:
            problems[name] = f"its output is changed in place before the activation {act!r} reads it"
        elif calls[act] != 1:
            problems[name] = f"the activation {act!r} after it runs {calls[act]} times (it is shared)"
        elif node is None or readers[(node, 0)] != 1:
            problems[name] = f"its output is read by more than the activation {act!r}"
        else:
            found[name] = act
    return found, problems
