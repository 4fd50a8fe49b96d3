"""Where a method lives: the layer of method ``x`` is in ``normlightning/norms/<x>.py`` and its math in
``normlightning/norms/functional/<x>.py`` (docs/methods.md, "Adding a method"); the functional checks the sizes
of its sets (the ``normlightning.norms.functional`` docstring)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from normlightning.norms import functional as NF
from normlightning.norms.registry import _REGISTRY

BUILT_IN = sorted(_REGISTRY)


@pytest.mark.parametrize("name", BUILT_IN)
def test_layer_and_math_modules_share_the_method_file_name(name):
    module = _REGISTRY[name].__module__
    package, _, stem = module.rpartition(".")
    assert package == "normlightning.norms", module
    math = f"normlightning.norms.functional.{stem}"
    assert importlib.util.find_spec(math) is not None, f"{name}: layer in {module}, no {math}"
    layer_source = importlib.import_module(module).__file__
    with open(layer_source) as f:
        text = f.read()
    assert f"functional.{stem}" in text or "from . import functional" in text, f"{module} does not use {math}"


ONE_VALUE_SETS = [
    ("ln", lambda x: NF.layer_norm(x, None, None, training=True), (3, 1), "LayerNorm: a set of one element"),
    ("pn", lambda x: NF.positional_norm(x, None, None, training=True), (3, 1, 4), "PositionalNorm: a set of one"),
    (
        "hn",
        lambda x: NF.heterologous_norm(
            x, ("in", 1), [("en", 1)], None, None, [torch.ones(1)], None, None, training=True
        ),
        (3, 1),
        "HeterologousNorm set in has one element",
    ),
    (
        "evonorm_s0",
        lambda x: importlib.import_module("normlightning.norms.functional.evonorm").evonorm_s0(
            x, torch.ones(2), None, None, num_groups=2, eps=1e-5, training=True
        ),
        (3, 2, 1),
        "EvoNormS0 has 1 element",
    ),
]


@pytest.mark.parametrize("name,call,shape,message", ONE_VALUE_SETS, ids=[case[0] for case in ONE_VALUE_SETS])
def test_the_functional_refuses_a_set_of_one_value_in_training(name, call, shape, message):
    x = torch.randn(shape)
    with pytest.raises(ValueError, match=message):
        call(x)
