"""The package's layers: each subpackage imports only the ones below it (README, "Development").

norms (the layers) <- injection (model surgery, plain PyTorch) <- models <- tasks, callbacks <- cli,
sweep; data and integrations (timm, above norms only) beside them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "normlightning"

#: subpackage -> the normlightning subpackages it must not import.
FORBIDDEN = {
    "norms": ("injection", "models", "tasks", "callbacks", "cli", "sweep", "data", "integrations"),
    "injection": ("models", "tasks", "callbacks", "cli", "sweep", "data"),
    "models": ("tasks", "callbacks", "cli", "sweep", "data"),
    "data": ("norms", "injection", "models", "tasks", "callbacks", "cli", "sweep"),
    "integrations": ("injection", "models", "tasks", "callbacks", "cli", "sweep", "data"),
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
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for module in _imported_modules(path):
            for above in FORBIDDEN[subpackage]:
                if module == f"normlightning.{above}" or module.startswith(f"normlightning.{above}."):
                    offending.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not offending, offending


def test_relative_imports_are_resolved() -> None:
    """The scanner sees ``from .registry import x`` in norms/norm_layer.py as normlightning.norms.registry."""
    assert "normlightning.norms.registry" in _imported_modules(PACKAGE / "norms" / "norm_layer.py")


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
