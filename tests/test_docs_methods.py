"""docs/methods.md documents every registered normalization method.

Docstrings cite "docs/methods.md, section <name>"; a method added to the registry without its section
(headed ``## <name>: <full name>``) fails here.  The registry's built-in methods are read in a fresh
interpreter: names that other tests or examples register at run time, and installed plugin packages
(documented by their own package), do not count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS_PAGE = REPO_ROOT / "docs" / "methods.md"
SECTION = re.compile(r"^## (\S+): \S", re.MULTILINE)


def _registered_methods() -> list[str]:
    """The built-in methods (``normlightning.norms.registry.BUILTIN_NORMS``) of a freshly imported package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    code = "import json; from normlightning.norms import registry; print(json.dumps(sorted(registry.BUILTIN_NORMS)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_registered_method_has_a_section() -> None:
    sections = SECTION.findall(METHODS_PAGE.read_text(encoding="utf-8"))
    assert len(sections) == len(set(sections)), f"duplicate method sections in {METHODS_PAGE}: {sorted(sections)}"
    registered = _registered_methods()
    assert registered, "normlightning.norms.registry.BUILTIN_NORMS is empty"
    missing = [name for name in registered if name not in sections]
    assert not missing, (
        f"{METHODS_PAGE.relative_to(REPO_ROOT)} has no section '## <name>: <full name>' for {missing}; "
        "document each new method there (paper, sets, running statistics, arguments, policies)."
    )
