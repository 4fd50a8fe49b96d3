"""normlightning uses Lightning's public API only: no private Lightning method is called or overridden,
and every method of a task or callback that overrides one of its base class is marked ``@override``.

A private method (a name starting with one underscore) of a Lightning class may change or vanish in any
release; ``ModelCheckpoint``'s once did for the CLI's checkpoint. The scan reads every module of the
package and flags an attribute ``x._name`` or a method ``def _name`` where ``_name`` is a method of one
of Lightning's classes that the package builds on (torch's own ``nn.Module`` internals aside).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "normlightning"

LIGHTNING_CLASSES = (
    pl.LightningModule,
    pl.LightningDataModule,
    pl.Trainer,
    pl.Callback,
    ModelCheckpoint,
    TQDMProgressBar,
    BasePredictionWriter,
    LayerSync,
    LightningCLI,
    LightningArgumentParser,
)


def _private_lightning_methods() -> set[str]:
    names = set()
    for cls in LIGHTNING_CLASSES:
        for name, value in inspect.getmembers(cls):
            private = name.startswith("_") and not name.startswith("__")
            if private and callable(value) and not hasattr(nn.Module, name):
                names.add(name)
    return names


def _uses(path: Path, private: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} uses {node.attr}")
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in private:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{item.lineno} overrides {item.name}")
    return found


def test_the_scan_knows_lightnings_private_methods() -> None:
    """The names the CLI's checkpoint once called are in the scanned set, and are found in code that calls them."""
    private = _private_lightning_methods()
    assert {"_save_topk_checkpoint", "_save_last_checkpoint", "_should_skip_saving_checkpoint"} <= private
    assert "_apply" not in private  # torch.nn.Module's, not Lightning's


def test_no_private_lightning_method_is_called_or_overridden() -> None:
    private = _private_lightning_methods()
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _uses(path, private)]
    assert not found, "\n".join(found)


#: Modules whose classes build on Lightning's (tasks, callbacks, the statistics-sync plugin, the CLI).
HOOK_MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    for folder in ("tasks", "callbacks")
    for path in (PACKAGE / folder).glob("*.py")
    if path.name != "__init__.py"
) + ["normlightning.training.norm_sync", "normlightning.cli"]


def _function(value: object) -> object | None:
    if isinstance(value, property):
        return value.fget
    if isinstance(value, (classmethod, staticmethod)):
        return value.__func__
    return value if inspect.isfunction(value) else None


@pytest.mark.parametrize("module_name", HOOK_MODULES)
def test_every_override_is_marked(module_name: str) -> None:
    """A method that overrides a base class's (a Lightning hook, or a task's own hook) carries ``@override``,
    so a renamed or removed base method is found by a type checker instead of silently never being called."""
    module = importlib.import_module(module_name)
    unmarked = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module_name:
            continue
        for name, value in vars(cls).items():
            function = _function(value)
            if function is None or name.startswith("__"):
                continue
            overrides = any(hasattr(base, name) for base in cls.__mro__[1:] if base is not object)
            if overrides and not getattr(function, "__override__", False):
                unmarked.append(f"{cls.__name__}.{name}")
    assert not unmarked, unmarked
