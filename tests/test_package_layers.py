"""The package's layers: each subpackage imports only the ones below it (README, "Development").

norms (the layers) <- injection (model surgery, plain PyTorch) <- models <- training, evaluation, attacks
(what tasks and callbacks are built from) <- tasks <- callbacks <- cli, sweep; data and integrations (timm,
above norms only) beside them; checkpoint_files (reading a checkpoint a user names) above injection, which it
must not need.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normlightning"

#: What tasks and callbacks are built from, and what reads a user's checkpoint file: above models.
BUILDING_BLOCKS = ("training", "evaluation", "attacks", "checkpoint_files")
#: The Lightning layers and the command.
TOP = ("tasks", "callbacks", "cli", "sweep")

#: subpackage (or module: ``name.py``) -> the normlightning subpackages and modules it must not import.
FORBIDDEN = {
    "norms": ("injection", "models", "data", "integrations", *BUILDING_BLOCKS, *TOP),
    "injection": ("models", "data", *BUILDING_BLOCKS, *TOP),
    "models": ("data", *BUILDING_BLOCKS, *TOP),
    "data": ("norms", "injection", "models", *BUILDING_BLOCKS, *TOP),
    "integrations": ("injection", "models", "data", *BUILDING_BLOCKS, *TOP),
    "training": ("data", "evaluation", "attacks", "checkpoint_files", *TOP),
    "evaluation": ("injection", "models", "data", "training", "attacks", "checkpoint_files", *TOP),
    "attacks.py": ("norms", "injection", "models", "data", "training", "evaluation", "checkpoint_files", *TOP),
    "checkpoint_files.py": ("norms", "injection", "models", "data", "training", "evaluation", "attacks", *TOP),
    "tasks": ("callbacks", "cli", "sweep"),
    "callbacks": ("cli", "sweep"),
}


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports (``from . import`` resolved against the package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_subpackage_imports_nothing_above_it(subpackage: str) -> None:
    offending = []
    place = PACKAGE / subpackage
    for path in [place] if place.is_file() else sorted(place.rglob("*.py")):
        for module in _imported_modules(path):
            for above in FORBIDDEN[subpackage]:
                above = above.removesuffix(".py")
                if module == f"normlightning.{above}" or module.startswith(f"normlightning.{above}."):
                    offending.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offending, offending


def test_relative_imports_are_resolved() -> None:
    """The scanner sees ``from .registry import x`` in norms/zoo_factory.py as normlightning.norms.registry."""
    assert "normlightning.norms.registry" in _imported_modules(PACKAGE / "norms" / "zoo_factory.py")


@pytest.mark.parametrize("module", ["normlightning.norms", "normlightning.injection"])
def test_model_surgery_imports_no_lightning(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_injection_exports_only_the_documented_user_api() -> None:
    """``normlightning.injection`` exports what README, docs and examples tell users to call; the parts
    (planning rows, spec records, layer installation) are imported from their modules by internal code."""
    import re

    import normlightning.injection as injection

    root = PACKAGE.parent
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").glob("*.py"))]
    user_text = "\n".join(path.read_text() for path in texts)
    undocumented = [name for name in injection.__all__ if not re.search(rf"\b{name}\b", user_text)]
    assert not undocumented, f"exported by normlightning.injection but named in no user doc or example: {undocumented}"
    assert not any("checkpoint" in name for name in injection.__all__), injection.__all__


def test_a_public_class_name_means_one_thing() -> None:
    """A public class name is not also the name of a module-level value elsewhere in the package (the
    ``NormStatistics`` callback once shared its name with a type alias of the few-shot task)."""
    classes: dict[str, list[str]] = {}
    values: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE))
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                classes.setdefault(node.name, []).append(where)
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(where)
    clashes = {name: (classes[name], values[name]) for name in classes.keys() & values.keys()}
    assert not clashes, clashes


@pytest.mark.parametrize(("subpackage", "base"), [("tasks", "LightningModule"), ("callbacks", "Callback")])
def test_tasks_hold_tasks_and_callbacks_hold_callbacks(subpackage: str, base: str) -> None:
    """Every module of tasks/ defines a LightningModule and every module of callbacks/ a Callback; what
    they are built from lives in training/, evaluation/ and attacks.py."""
    import importlib
    import inspect

    import lightning.pytorch as pl

    base_class = getattr(pl, base)
    strays = []
    for path in sorted((PACKAGE / subpackage).glob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(f"normlightning.{subpackage}.{path.stem}")
        defined = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        if not any(issubclass(c, base_class) for c in defined):
            strays.append(path.name)
    assert not strays, f"{subpackage}/ modules without a {base}: {strays}"
